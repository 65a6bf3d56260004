// The official openai client against prefixkv serve (run by tests/e2e/test_server_openai.cc):
//   node chat.mjs BASE_URL API_KEY IMAGE MAX_TOKENS
// Prints one JSON object: the model list, a plain and a streamed chat with the image, and the
// errors the client raises for an unknown model and a wrong key.
import fs from 'node:fs';
import OpenAI from 'openai';

const [baseURL, apiKey, imagePath, maxTokens] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 120000 });
const image = 'data:image/png;base64,' + fs.readFileSync(imagePath).toString('base64');
const messages = [{
  role: 'user',
  content: [
    { type: 'image_url', image_url: { url: image } },
    { type: 'text', text: 'Describe the image in detail.' },
  ],
}];
const out = {};

const models = await client.models.list();
out.models = models.data.map((m) => m.id);
const model = out.models[0];

const plain = await client.chat.completions.create({ model, messages, max_tokens: Number(maxTokens), temperature: 0 });
out.plain = {
  text: plain.choices[0].message.content,
  finish_reason: plain.choices[0].finish_reason,
  usage: plain.usage,
};

const stream = await client.chat.completions.create({
  model, messages, max_tokens: Number(maxTokens), temperature: 0, stream: true, stream_options: { include_usage: true },
});
out.stream = { text: '', chunks: 0, finish_reason: null, usage: null };
for await (const chunk of stream) {
  if (chunk.usage) out.stream.usage = chunk.usage;
  for (const choice of chunk.choices) {
    out.stream.chunks += 1;
    if (choice.delta?.content) out.stream.text += choice.delta.content;
    if (choice.finish_reason) out.stream.finish_reason = choice.finish_reason;
  }
}

async function errorOf(promise) {
  try {
    await promise;
    return null;
  } catch (e) {
    return { status: e.status ?? null, name: e.constructor.name, code: e.code ?? null, message: e.message };
  }
}
out.errors = {
  model: await errorOf(client.chat.completions.create({ model: 'no-such-model', messages, max_tokens: 1 })),
  key: await errorOf(new OpenAI({ baseURL, apiKey: 'wrong', maxRetries: 0 }).models.list()),
  budget: await errorOf(client.chat.completions.create({ model, messages, max_tokens: 1, kv_budget: 2 })),
};
console.log(JSON.stringify(out));
