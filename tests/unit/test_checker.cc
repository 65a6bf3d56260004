#include <gtest/gtest.h>

#include "test_util.h"

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "eval/checker.h"

using namespace pkv;
using nlohmann::json;

namespace {

// data/ of the repository (tests/data/../../data).
std::string repo_data(const std::string& rel) { return std::string(PKV_TEST_DATA) + "/../../data/" + rel; }

json read_json(const std::string& path) {
  std::ifstream f(path);
  EXPECT_TRUE(f.good()) << path;
  return json::parse(f);
}

// The "gpt" turn / the question of a LLaVA conversation item.
std::string gpt_turn(const json& item) { return item["conversations"][1]["value"].get<std::string>(); }
std::string human_prompt(const json& item) {
  std::string v = item["conversations"][0]["value"].get<std::string>();
  const std::string tag = "<image>\n";
  return v.rfind(tag, 0) == 0 ? v.substr(tag.size()) : v;
}

const char* kSets[][2] = {{"eval", "eval/eval.json"}, {"calib", "calib/calib.json"}};

// An answer the selftest of tools/scenes.py uses as wrong for each question type.
std::string wrong_answer(const SceneQuestion& qa) {
  const std::string& a = qa.answer;
  if (qa.type == "count_shape") return std::to_string(std::stoi(a) + 1);
  if (qa.type == "count_color" || qa.type == "count_all") return a == "9" ? "8" : "9";
  if (qa.type == "exists") return a == "Yes" ? "No" : "Yes";
  if (qa.type == "what_at") return a != "A large black circle" ? "A large black circle" : "Nothing";
  if (qa.type == "color_at") return a != "Pink" ? "Pink" : "Red";
  if (qa.type == "size_at") return a != "Large" ? "Large" : "Small";
  if (qa.type == "where") return a.find("bottom right") == std::string::npos ? "In the bottom right" : "In the top left";
  ADD_FAILURE() << "unknown question type " << qa.type;
  return "";
}

}  // namespace

TEST(Checker, ReferenceDescriptionsScoreOne) {
  for (auto [set, file] : kSets) {
    const TruthSet truth = TruthSet::load(repo_data(std::string(set) + "/truth.json"));
    const json items = read_json(repo_data(file));
    ASSERT_EQ(items.size(), truth.size()) << set;
    for (const auto& item : items) {
      const std::string id = item["id"];
      const SceneTruth* sc = truth.find(id);
      ASSERT_NE(sc, nullptr) << id;
      const std::string text = gpt_turn(item);
      EXPECT_EQ(text, sc->description) << id;
      EXPECT_EQ(score_description(text, *sc), 1.0) << id << ": " << text;
      const auto rep = description_report(text, *sc);
      EXPECT_TRUE(rep.extra_positions.empty()) << id;
      EXPECT_EQ(rep.verdicts.size(), sc->objects.size());
    }
  }
}

TEST(Checker, ReferenceAnswersAreCorrectAndWrongOnesWrong) {
  for (auto [set, file] : kSets) {
    (void)file;
    const TruthSet truth = TruthSet::load(repo_data(std::string(set) + "/truth.json"));
    const json items = read_json(repo_data(std::string(set) + "/questions.json"));
    ASSERT_GT(items.size(), truth.size()) << set;
    for (const auto& item : items) {
      const std::string id = item["id"];
      const auto ref = truth.find_question(id);
      ASSERT_TRUE(ref.has_value()) << id;
      EXPECT_EQ(human_prompt(item), ref->question->question) << id;
      EXPECT_EQ(gpt_turn(item), ref->question->answer) << id;
      const std::string& q = ref->question->question;
      EXPECT_TRUE(score_answer(q, gpt_turn(item), *ref->scene)) << id << ": " << q;
      // Free-form variants of the right answer (the selftest's lower case + full stop).
      std::string lower = gpt_turn(item);
      for (auto& c : lower) c = char(std::tolower((unsigned char)c));
      EXPECT_TRUE(score_answer(q, lower + ".", *ref->scene)) << id;
      const std::string wrong = wrong_answer(*ref->question);
      EXPECT_FALSE(score_answer(q, wrong, *ref->scene)) << id << ": " << q << " / " << wrong;
      EXPECT_FALSE(score_answer(q, "", *ref->scene)) << id;
    }
  }
}

// The selftest of tools/scenes.py, on every evaluation scene: a changed colour, shape, size or cell
// costs exactly one object; so does a dropped object sentence; sentence order does not matter.
TEST(Checker, CorruptedDescriptionsLoseExactlyOneObject) {
  const TruthSet truth = TruthSet::load(repo_data("eval/truth.json"));
  for (const SceneTruth& sc : truth.scenes()) {
    const double n = double(sc.objects.size());
    const double one_off = (n - 1) / n;
    const std::string& ref = sc.description;
    const SceneObject& o = sc.objects[0];
    const std::string phrase = o.size + " " + o.color + " " + o.shape;
    const size_t at = ref.find(phrase);
    ASSERT_NE(at, std::string::npos) << sc.id;
    auto replaced = [&](const std::string& with) {
      std::string t = ref;
      return t.replace(at, phrase.size(), with);
    };
    const std::string other_color = o.color == "red" ? "blue" : "red";
    const std::string other_shape = o.shape == "star" ? "cross" : "star";
    const std::string other_size = o.size == "small" ? "large" : "small";
    EXPECT_EQ(score_description(replaced(o.size + " " + other_color + " " + o.shape), sc), one_off) << sc.id;
    EXPECT_EQ(score_description(replaced(o.size + " " + o.color + " " + other_shape), sc), one_off) << sc.id;
    EXPECT_EQ(score_description(replaced(other_size + " " + o.color + " " + o.shape), sc), one_off) << sc.id;
    EXPECT_EQ(score_description("", sc), 0.0);

    // Object 0 claimed in a cell that is empty in truth (there are at most 7 objects).
    std::string empty_cell;
    for (int r = 0; r < 3; ++r)
      for (int c = 0; c < 3; ++c) {
        bool used = false;
        for (const auto& p : sc.objects) used = used || p.cell == Cell{r, c};
        if (!used) empty_cell = position_name(Cell{r, c});
      }
    ASSERT_FALSE(empty_cell.empty());
    const auto sents = split_sentences(ref);
    // Sentence 0 is the introduction, 1..n the objects in truth order.
    std::string dropped, reversed, moved;
    for (size_t i = 0; i < sents.size(); ++i) {
      if (i != 1) dropped += (dropped.empty() ? "" : " ") + sents[i];
      reversed = sents[i] + (reversed.empty() ? "" : " ") + reversed;
      const std::string s = i == 1 ? "In the " + empty_cell + " there is a " + phrase + "." : sents[i];
      moved += (moved.empty() ? "" : " ") + s;
    }
    EXPECT_EQ(score_description(dropped, sc), one_off) << sc.id << ": " << dropped;
    EXPECT_EQ(score_description(reversed, sc), 1.0) << sc.id;
    EXPECT_EQ(score_description(moved, sc), one_off) << sc.id << ": " << moved;
  }
}

// tests/data/checker_cases.json: texts and answers scored by tools/scenes.py itself (made by
// tools/make_checker_cases.py); the port must give exactly the same numbers.
TEST(Checker, MatchesPythonOnGoldenCases) {
  const json cases = read_json(test::data_path("checker_cases.json"));
  const TruthSet truth = TruthSet::load(repo_data("eval/truth.json"));
  ASSERT_GE(cases["descriptions"].size(), 100u);
  ASSERT_GE(cases["answers"].size(), 200u);
  int lost = 0;
  for (const auto& c : cases["descriptions"]) {
    const SceneTruth* sc = truth.find(c["scene"]);
    ASSERT_NE(sc, nullptr);
    const double want = c["score"].get<double>();
    EXPECT_EQ(score_description(c["text"].get<std::string>(), *sc), want)
        << c["scene"] << " (" << c["note"] << "): " << c["text"];
    lost += want < 1.0;
  }
  EXPECT_GE(lost, 40);  // the cases do exercise failures
  int errors = 0;
  for (const auto& c : cases["answers"]) {
    const SceneTruth* sc = truth.find(c["scene"]);
    ASSERT_NE(sc, nullptr);
    const std::string q = c["question"], a = c["answer"];
    if (c.value("error", false)) {
      EXPECT_THROW(score_answer(q, a, *sc), Error) << q;
      ++errors;
    } else {
      EXPECT_EQ(score_answer(q, a, *sc), c["correct"].get<bool>()) << c["scene"] << " (" << c["note"] << "): " << q
                                                                   << " / " << a;
    }
  }
  EXPECT_GE(errors, 5);
}

TEST(Checker, PositionAndObjectParsers) {
  // The selftest's cases of tools/scenes.py.
  EXPECT_EQ(find_positions("In the top left corner there is"), (std::vector<Cell>{{0, 0}}));
  EXPECT_EQ(find_positions("the top center and the center"), (std::vector<Cell>{{0, 1}, {1, 1}}));
  EXPECT_EQ(find_positions("the middle right"), (std::vector<Cell>{{1, 2}}));
  EXPECT_EQ(find_positions("Upper-Right, lower  left, CENTRE"), (std::vector<Cell>{{0, 2}, {2, 0}, {1, 1}}));
  EXPECT_EQ(find_positions("the middle of the top row"), (std::vector<Cell>{{1, 1}}));
  EXPECT_TRUE(find_positions("stop left; epicenter").empty());

  const auto objs = find_objects("A Large  Red circles and a small black star; medium green crosses.");
  ASSERT_EQ(objs.size(), 3u);
  EXPECT_EQ(objs[0], (ObjectMention{"large", "red", "circle"}));
  EXPECT_EQ(objs[1], (ObjectMention{"small", "black", "star"}));
  EXPECT_EQ(objs[2], (ObjectMention{"medium", "green", "cross"}));
  EXPECT_TRUE(find_objects("small red circled, tiny red circle, small red").empty());

  EXPECT_EQ(split_sentences("One. Two!Three?  Four;five\n\nsix.\n"),
            (std::vector<std::string>{"One.", "Two!Three?", "Four;five", "six."}));
  EXPECT_TRUE(split_sentences(" \n \n").empty());
}

TEST(Checker, QuestionIdsAndForms) {
  const TruthSet truth = TruthSet::load(repo_data("eval/truth.json"));
  EXPECT_EQ(truth.size(), 200u);
  ASSERT_NE(truth.find("scene000000"), nullptr);
  EXPECT_EQ(truth.find("scene000000")->seed, 0);
  EXPECT_EQ(truth.find("scene999999"), nullptr);
  const auto q = truth.find_question("scene000000_q1");
  ASSERT_TRUE(q.has_value());
  EXPECT_EQ(q->scene, truth.find("scene000000"));
  EXPECT_EQ(q->index, 1);
  EXPECT_EQ(q->question, &truth.find("scene000000")->questions[1]);
  EXPECT_FALSE(truth.find_question("scene000000").has_value());
  EXPECT_FALSE(truth.find_question("scene000000_q99").has_value());
  EXPECT_FALSE(truth.find_question("scene000000_q").has_value());
  EXPECT_FALSE(truth.find_question("scene000000_qx").has_value());
  EXPECT_FALSE(truth.find_question("_q1").has_value());
  EXPECT_FALSE(truth.find_question("nope_q1").has_value());

  const SceneTruth& sc = *truth.find("scene000000");  // 5 objects, a large red square in the center
  EXPECT_TRUE(score_answer("How many objects are there in the image?", "There are five.", sc));
  EXPECT_TRUE(score_answer("What is in the center?", "A large red square.", sc));
  EXPECT_TRUE(score_answer("What is in the bottom left?", "Nothing, it is empty.", sc));
  EXPECT_FALSE(score_answer("What is in the bottom left?", "A large red square.", sc));
  try {
    score_answer("What is the meaning of this?", "42", sc);
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("What is the meaning of this?"), std::string::npos) << e.what();
  }
}

TEST(Checker, OddTextNeverBreaksIt) {
  const TruthSet truth = TruthSet::load(repo_data("eval/truth.json"));
  const SceneTruth& sc = *truth.find("scene000000");
  // Invalid UTF-8 (lone continuation, truncated sequences, overlong form, bytes FE FF) reads as
  // U+FFFD, a non-word character: the object next to it still counts.
  const std::string bad = "\x80\xC3 In the top left corner there is a small red circle\xE2\x82.\xF0\x9F \xC0\xAF\xFE\xFF";
  EXPECT_EQ(score_description(bad, sc), 1.0 / 5);
  EXPECT_EQ(score_description(std::string("In the top left there is a small red circle\0.", 45), sc), 1.0 / 5);
  EXPECT_EQ(score_description(std::string(100000, '.'), sc), 0.0);
  EXPECT_TRUE(score_answer("How many circles are there?", "\xEF\xBC\x91", sc));  // FULLWIDTH DIGIT ONE
}

TEST(Checker, MalformedTruthNamesFileAndEntry) {
  const std::string good_obj = R"({"row": 0, "col": 0, "position": "top left", "shape": "circle", "color": "red", "size": "small"})";
  auto entry = [](const std::string& objects, const std::string& questions = "[]") {
    return R"({"scene000005": {"seed": 5, "objects": )" + objects + R"(, "questions": )" + questions + "}}";
  };
  struct Case {
    std::string text, expect;
  };
  const std::vector<Case> cases = {
      {"{\"scene000005\": ", "not valid JSON"},
      {"[1, 2]", "expected an object"},
      {R"({"scene000005": 3})", "scene000005"},
      {R"({"scene000005": {"questions": []}})", "missing field 'objects'"},
      {entry("[" + good_obj + "]", "3"), "field 'questions' must be an array"},
      {entry(R"([{"row": 3, "col": 0, "position": "top left", "shape": "circle", "color": "red", "size": "small"}])"),
       "field 'row' must be an integer 0..2"},
      {entry(R"([{"row": 0, "col": "0", "position": "top left", "shape": "circle", "color": "red", "size": "small"}])"),
       "field 'col'"},
      {entry(R"([{"row": 0, "col": 0, "position": "top left", "shape": "hexagon", "color": "red", "size": "small"}])"),
       "'hexagon', not one of circle"},
      {entry(R"([{"row": 0, "col": 0, "position": "top left", "shape": "circle", "color": "teal", "size": "small"}])"),
       "field 'color'"},
      {entry(R"([{"row": 0, "col": 0, "position": "top left", "shape": "circle", "color": "red"}])"),
       "missing field 'size'"},
      {entry(R"([{"row": 1, "col": 1, "position": "top left", "shape": "circle", "color": "red", "size": "small"}])"),
       "disagrees with row 1, col 1"},
      {entry("[" + good_obj + ", " + good_obj + "]"), "objects[1]: a second object"},
      {entry("[" + good_obj + "]", R"([{"question": "Is there a red circle?"}])"), "questions[0]: missing field 'answer'"},
      {R"({"scene000005": {"seed": "five", "objects": [], "questions": []}})", "field 'seed' must be an integer"},
  };
  const std::string path = test::temp_path("truth.json");
  for (const auto& c : cases) {
    {
      std::ofstream f(path);
      f << c.text;
    }
    try {
      TruthSet::load(path);
      ADD_FAILURE() << "no error for " << c.text;
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(path), std::string::npos) << msg;
      EXPECT_NE(msg.find(c.expect), std::string::npos) << msg;
      if (c.text.find("scene000005") != std::string::npos && c.expect != "not valid JSON") {
        EXPECT_NE(msg.find("entry 'scene000005'"), std::string::npos) << msg;
      }
    }
  }
  std::filesystem::remove(path);
  EXPECT_THROW(TruthSet::load(test::temp_path("missing.json")), Error);
}
