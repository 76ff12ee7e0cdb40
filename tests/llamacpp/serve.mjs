// The stand-in's llama.cpp engine (tests/ollama_standin.py, LlamaCppEngine): one model and one
// context kept loaded between requests, as Ollama's runner keeps them.
//
//   node serve.mjs THREADS
//
// One JSON request per line on stdin, one JSON answer per line on stdout, in order:
//   {"op": "load", "model": PATH, "context_size": N, "batch_size": B}             -> {}
//   {"op": "generate", "model", "context_size", "batch_size", "prompt", "options"} -> {"text",
//       "prompt_tokens", "cached", "reply_tokens", "done_reason"}
//   {"op": "unload"}                                                              -> {}
// Loading another model (or another context or batch size) disposes the old one; generate loads what
// it names. A failed request answers {"error": "..."}; the end of stdin disposes everything and exits.
//
// generate: the prompt is tokenized with special tokens parsed (as Ollama parses a rendered TEMPLATE),
// BOS prepended when the vocabulary wants one; options go to LlamaCompletion.generateCompletionWithMeta
// as they come (the stand-in maps Ollama's options to them). The sequence keeps its tokens between
// requests, and LlamaCompletion evaluates only what follows the tokens the context kept
// (adaptStateToTokens), as Ollama's runner reuses its cache slot. What is kept is the longest common
// prefix with the tokens already evaluated, cut to whole batches (keepWholeBatches): llama.cpp's
// logits depend on how tokens were batched, so a prompt evaluated on a kept prefix gets the logits,
// and the greedy reply, that it gets on a new context.
// prompt_tokens: the whole prompt (what Ollama reports); cached: the tokens of it not evaluated again;
// reply_tokens: the tokens sampled, an end token included (Ollama's eval_count).
import { createInterface } from "node:readline";
import { getLlama, LlamaCompletion } from "node-llama-cpp";

const threads = Number(process.argv[2] || 2);
const llama = await getLlama({ gpu: false, build: "never", logLevel: "error",
    logger: (level, message) => process.stderr.write(`${message}\n`) });
let current = null; // {path, model, shape, batchSize, context, sequence, completion, wholeBatches}

async function unload() {
    const old = current;
    current = null;
    await old?.context?.dispose();
    await old?.model.dispose();
    return {};
}

async function load({ model: modelPath, context_size: contextSize, batch_size: batchSize }) {
    if (current?.path !== modelPath) {
        await unload();
        current = { path: modelPath, model: await llama.loadModel({ modelPath }) };
    }
    if (current.shape !== `${contextSize}/${batchSize}`) {
        const old = current.context;
        current.context = current.shape = null;
        await old?.dispose();
        current.context = await current.model.createContext({ threads, contextSize, batchSize });
        Object.assign(current, { shape: `${contextSize}/${batchSize}`, batchSize, wholeBatches: 0 });
        current.sequence = current.context.getSequence();
        current.completion = new LlamaCompletion({ contextSequence: current.sequence });
    }
    return {};
}

// Erase from the context what the next prompt shall evaluate: all but the longest common prefix, cut
// to whole batches that earlier prompts evaluated as whole batches (current.wholeBatches tokens), so
// that every prompt token is evaluated in the same batch as on a new context. (A reply's tokens are
// evaluated one by one and are never kept; Ollama keeps the exact prefix and batches from there.)
async function keepWholeBatches(tokens) {
    const { sequence, batchSize } = current;
    const common = Math.min(sequence.compareContextTokens(tokens).firstDifferentIndex, tokens.length - 1,
        current.wholeBatches);
    await sequence.eraseContextTokenRanges([{ start: common - (common % batchSize), end: sequence.nextTokenIndex }]);
}

async function generate(request) {
    await load(request);
    const { model, sequence, completion } = current;
    const input = model.tokenize(request.prompt, true);
    const bos = model.tokens.bos != null && model.tokens.shouldPrependBosToken ? [model.tokens.bos] : [];
    const promptTokens = bos.length + input.length;
    await keepWholeBatches([...bos, ...input]);
    current.wholeBatches = 0; // until this prompt's batches are known to be whole
    const before = sequence.tokenMeter.getState();
    const { response, metadata } = await completion.generateCompletionWithMeta(input, request.options);
    // input: prompt tokens decoded without logits; output: one per sampled token (the last prompt
    // token's logits give the first)
    const used = sequence.tokenMeter.diff(before);
    const unshifted = sequence.nextTokenIndex === promptTokens + used.usedOutputTokens - 1;
    current.wholeBatches = unshifted ? promptTokens - (promptTokens % current.batchSize) : 0;
    return { text: response, prompt_tokens: promptTokens, cached: promptTokens - used.usedInputTokens - 1,
        reply_tokens: used.usedOutputTokens, done_reason: metadata.stopReason === "maxTokens" ? "length" : "stop" };
}

const ops = { load, generate, unload };
for await (const line of createInterface({ input: process.stdin, crlfDelay: Infinity })) {
    if (!line.trim())
        continue;
    let answer;
    try {
        const request = JSON.parse(line);
        if (!Object.hasOwn(ops, request.op))
            throw new Error(`unknown op ${JSON.stringify(request.op)}`);
        answer = await ops[request.op](request);
    } catch (error) {
        answer = { error: String(error?.message ?? error) };
    }
    process.stdout.write(JSON.stringify(answer) + "\n");
}
await unload();
await llama.dispose();
