// llama.cpp's CPU speed (the npm package node-llama-cpp) on a GGUF, greedy, as JSON:
//   node llamacpp_speed.mjs MODEL.gguf N "prompt"   (run from a folder where node-llama-cpp is installed)
// Times the model load, the prompt with its first token (llama.cpp evaluates the prompt and samples
// in one call) and each later token; the prompt is BOS + llama.cpp's tokenization of the text; N
// tokens, EOS not stopping. LLAMACPP_THREADS (default 2) threads; LLAMACPP_MMAP=0: the weights read
// into memory rather than mapped (llama.cpp's --no-mmap). bench/cpu_llamacpp.sh runs it.
import {getLlama} from "node-llama-cpp";
const [modelPath, n, text] = process.argv.slice(2);
const threads = Number(process.env.LLAMACPP_THREADS ?? 2);
const now = () => Number(process.hrtime.bigint()) / 1e6;
const llama = await getLlama({gpu: false, build: "never"});
const t0 = now();
const model = await llama.loadModel({modelPath, useMmap: process.env.LLAMACPP_MMAP !== "0"});
const t1 = now();
const context = await model.createContext({contextSize: 1024, threads});
const seq = context.getSequence();
const prompt = [model.tokens.bos, ...model.tokenize(text)];
const out = [], stamps = [];
const t2 = now();
for await (const t of seq.evaluate(prompt, {temperature: 0})) {
  out.push(t);
  stamps.push(now());
  if (out.length >= Number(n)) break;
}
const first_ms = stamps[0] - t2;
const decode_ms = stamps[stamps.length - 1] - stamps[0];
console.log(JSON.stringify({
  llama_cpp: llama.llamaCppRelease ?? null, threads, prompt_tokens: prompt.length, tokens: out,
  load_ms: t1 - t0, prompt_and_first_token_ms: first_ms,
  decode_tokens_per_s: out.length > 1 ? (out.length - 1) / (decode_ms / 1e3) : null,
}));
process.exit(0);
