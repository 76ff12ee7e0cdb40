// llama.cpp's greedy completion of a rendered prompt, for tests/test_llamacpp.py.
//
//   node complete.mjs MODEL.gguf PROMPT_FILE MAX_TOKENS
//
// The prompt is tokenized with special tokens parsed (as Ollama does for a rendered TEMPLATE);
// node-llama-cpp prepends BOS when the model's vocabulary wants one. Prints one JSON line:
// {"prompt_tokens": [...], "tokens": [...], "text": "..."}, generated tokens up to (not
// including) an end-of-generation token. Uses only the prebuilt CPU binary, never builds.
import { readFileSync } from "node:fs";
import { getLlama, LlamaCompletion } from "node-llama-cpp";

const [modelPath, promptPath, maxTokens] = process.argv.slice(2);
const llama = await getLlama({ gpu: false, build: "never", logLevel: "error" });
const model = await llama.loadModel({ modelPath });
const context = await model.createContext({ threads: 2, contextSize: 512 });
const completion = new LlamaCompletion({ contextSequence: context.getSequence() });
const input = model.tokenize(readFileSync(promptPath, "utf8"), true);
const tokens = [];
const text = await completion.generateCompletion(input, {
    maxTokens: Number(maxTokens),
    temperature: 0,
    repeatPenalty: false,
    onToken: (chunk) => tokens.push(...chunk),
});
const bos = model.tokens.bos;
const promptTokens = bos != null && model.tokens.shouldPrependBosToken ? [bos, ...input] : input;
console.log(JSON.stringify({ prompt_tokens: promptTokens, tokens, text }));
await context.dispose();
await model.dispose();
await llama.dispose();
