// Greedy tokens from llama.cpp (the npm package node-llama-cpp, CPU) for a GGUF, as JSON:
//   node llamacpp_greedy.mjs MODEL.gguf N "prompt"   (run from a folder where node-llama-cpp is installed)
// The prompt is BOS + llama.cpp's tokenization of the text; N tokens, EOS not stopping (bench/gguf_llamacpp.sh).
import {getLlama} from "node-llama-cpp";
const [modelPath, n, text] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath});
// One thread by default: on a busy 2-core machine, llama.cpp's spinning worker threads made a
// 32-token run take minutes (LLAMACPP_THREADS=N for more).
const context = await model.createContext({contextSize: 512, threads: Number(process.env.LLAMACPP_THREADS ?? 1)});
const seq = context.getSequence();
const prompt = [model.tokens.bos, ...model.tokenize(text)];
const out = [];
for await (const t of seq.evaluate(prompt, {temperature: 0})) {
  out.push(t);
  if (out.length >= Number(n)) break;  // EOS too, as prefixkv run --ignore-eos
}
console.log(JSON.stringify({llama_cpp: llama.llamaCppRelease ?? null, prompt, tokens: out}));
process.exit(0);
