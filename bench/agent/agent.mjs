// An "agent" doing real inference on the CPU with llama.cpp's prebuilt runtime (node-llama-cpp):
// completes prompts back to back for --seconds and prints one JSON line per completion
// {"start", "end", "tokens"} (wall-clock seconds). With --log FILE it appends one agent log line
// before its first completion, as local-ai-coder does after each turn: lacd sees the developer.
//   node agent.mjs --model M.gguf --seconds 60 [--threads 2] [--tokens 64] [--log agent_interactions.jsonl]
import {appendFileSync} from "node:fs";
import {getLlama, LlamaCompletion} from "node-llama-cpp";

const args = Object.fromEntries(process.argv.slice(2).reduce((pairs, a, i, all) =>
    a.startsWith("--") ? [...pairs, [a.slice(2), all[i + 1]]] : pairs, []));
const seconds = Number(args.seconds ?? 60), threads = Number(args.threads ?? 2), maxTokens = Number(args.tokens ?? 64);

const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath: args.model});
const context = await model.createContext({threads, contextSize: 512});
const completion = new LlamaCompletion({contextSequence: context.getSequence()});
const prompts = ["def parse_config(path):\n", "# Read a CSV file and print the sum of the second column\n",
                 "class LRUCache:\n    def __init__(self, capacity):\n", "function debounce(fn, ms) {\n"];
if (args.log) {
    appendFileSync(args.log, JSON.stringify({user_prompt: "bench: the developer is back", ai_responses: ["ok"],
                                             tool_executions: []}) + "\n");
}
console.log(JSON.stringify({ready: Date.now() / 1000}));
const until = Date.now() + seconds * 1000;
for (let i = 0; Date.now() < until; i++) {
    const start = Date.now() / 1000;
    let tokens = 0;
    await completion.generateCompletion(prompts[i % prompts.length], {maxTokens, onToken: (t) => { tokens += t.length; }});
    console.log(JSON.stringify({start, end: Date.now() / 1000, tokens}));
}
await context.dispose();
await model.dispose();
