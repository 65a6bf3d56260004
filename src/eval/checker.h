// Scene checker for the bundled model's synthetic data (data/eval, data/calib): a port of the
// checker of tools/scenes.py (score_description, score_answer and the parsers they use). It gives
// exactly the scores of the Python on the same text: the Python matches with Unicode-aware regular
// expressions (\b, \w, \s and \d follow Unicode; lower() is str.lower()), and so does this port,
// with the character classes taken from Python 3.11's tables (Unicode 14). Text is UTF-8; an
// invalid byte reads as U+FFFD (what Python's errors="replace" decoding gives), a non-word character.
// tests/data/checker_cases.json (tools/make_checker_cases.py) holds the Python's scores of varied
// texts; tests/unit/test_checker.cc checks this port against them.
//
// The ground truth is data/*/truth.json: {scene id: {"objects": [{"row", "col", "position",
// "shape", "color", "size"}, ...], "questions": [{"question", "answer", "type"}, ...], "seed",
// "background", "description", ...}}. Question ids look like "<scene id>_q<k>" (data/*/questions.json):
// the k-th question of that scene.
#pragma once
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace pkv {

struct Cell {
  int row = 0, col = 0;  // 0..2, row 0 is the top, col 0 the left
  auto operator<=>(const Cell&) const = default;
};
std::string position_name(Cell c);  // "top left", ..., "center" (as in scenes.py)

struct SceneObject {
  Cell cell;
  std::string position;  // position_name(cell)
  std::string shape;     // circle | square | triangle | star | cross
  std::string color;     // red | orange | yellow | green | blue | purple | pink | black
  std::string size;      // small | medium | large
};

struct SceneQuestion {
  std::string question;  // e.g. "What color is the star in the top center?"
  std::string answer;    // the reference answer, e.g. "Yellow"
  std::string type;      // count_shape | count_color | count_all | what_at | exists | color_at | where | size_at
};

struct SceneTruth {
  std::string id;  // "scene000003"
  long long seed = -1;
  std::string background, description, prompt, image;
  std::vector<SceneObject> objects;  // row-major, one per cell
  std::vector<SceneQuestion> questions;

  // One entry of truth.json. `where` names the entry in errors ("FILE: entry 'scene000003'").
  // Throws Error for a missing or mistyped field, an unknown shape / colour / size, a cell outside
  // the 3 x 3 grid, a position that disagrees with row and col, or two objects in one cell.
  static SceneTruth from_json(const std::string& id, const nlohmann::json& j, const std::string& where);
};

class TruthSet {
 public:
  // Throws Error naming the file (and the entry, for a malformed entry).
  static TruthSet load(const std::string& path);
  static TruthSet from_json(const nlohmann::json& j, const std::string& where);

  const SceneTruth* find(const std::string& id) const;  // nullptr when the id is not a scene here

  struct QuestionRef {
    const SceneTruth* scene = nullptr;
    const SceneQuestion* question = nullptr;
    int index = 0;  // k of "<scene>_q<k>"
  };
  // "<scene>_q<k>" with <scene> a scene here and k < its question count; nullopt otherwise (as
  // scenes.py's score_predictions decides between a question id and a description id).
  std::optional<QuestionRef> find_question(const std::string& id) const;

  const std::vector<SceneTruth>& scenes() const { return scenes_; }  // in id order
  size_t size() const { return scenes_.size(); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::vector<SceneTruth> scenes_;
  std::unordered_map<std::string, size_t> index_;
};

// ---- parsers (scenes.py's find_positions, find_objects, _split_sentences)

// All cells named in a text, in order of appearance ("top left", "upper-right", "middle", "centre",
// ...; a two-word name wins over the "middle" / "center" inside it).
std::vector<Cell> find_positions(const std::string& text);

struct ObjectMention {
  std::string size, color, shape;  // shape singular ("circles" -> "circle")
  bool operator==(const ObjectMention&) const = default;
};
// All "<size> <colour> <shape>" mentions, in order.
std::vector<ObjectMention> find_objects(const std::string& text);

// Splits after . ! ? ; followed by white space, and at line breaks; drops blank pieces.
std::vector<std::string> split_sentences(const std::string& text);

// ---- scores

struct DescriptionReport {
  struct Verdict {
    std::string position;          // of the ground-truth object
    std::string want;              // "small red circle"
    std::vector<std::string> got;  // what the sentences about its cell claim
    bool correct = false;
  };
  std::vector<Verdict> verdicts;             // one per ground-truth object, in truth order
  std::vector<std::string> extra_positions;  // claimed cells that are empty in truth, sorted by name
  double score = 0;                          // correct / max(1, objects)
};
// A ground-truth object is correct when some sentence names exactly its cell and exactly one
// object, and every such sentence names the right size, colour and shape. Extra objects are
// reported, not penalised.
DescriptionReport description_report(const std::string& text, const SceneTruth& scene);
// Fraction of the scene's objects described correctly, in [0, 1].
double score_description(const std::string& text, const SceneTruth& scene);

struct ExpectedAnswer {
  enum class Kind { Count, YesNo, Object, Color, Size, Where };
  Kind kind = Kind::Count;
  int count = 0;                       // Count
  bool yes = false;                    // YesNo
  std::optional<ObjectMention> object;  // Object: nullopt when the cell is empty
  std::optional<std::string> value;    // Color / Size: nullopt when no object is at the cell
  std::optional<Cell> cell;            // Where: nullopt unless exactly one object matches
};
// What a templated question asks and its answer from the ground truth. Throws Error (where
// "question") for a question form the checker does not know, as scenes.py raises ValueError.
ExpectedAnswer expected_answer(const std::string& question, const SceneTruth& scene);
// True when `answer` is a right answer to the templated `question` for the scene (free form:
// "3", "three", "There are 3.", "A small red circle.", "In the top left corner", ...).
bool score_answer(const std::string& question, const std::string& answer, const SceneTruth& scene);

}  // namespace pkv
