"""Benchmark: the evaluate stage's /api/chat replies through llama.cpp, the engine inside Ollama (issue 14).

    PYTHONPATH=daemon:tests python bench/llamacpp_replies.py --store STORE [--model lacd-coder:v1]
        [--threads 2] [--standin-port 0] [--standin-engine transformers|llamacpp]

No Ollama can be installed here, so a timed `lacd train` registers with the stand-in
(tests/ollama_standin.py), which generates with transformers: the GGUF dequantized to fp32, one
request at a time. This replays the /api/chat requests a stand-in served (STORE/requests.jsonl: the
held-out prompts the evaluate stage sent for --model), each rendered with the model's registered
TEMPLATE and SYSTEM as the stand-in (and Ollama) renders them, through node-llama-cpp (the prebuilt
llama.cpp CPU binary in tests/llamacpp, `npm ci --prefix tests/llamacpp`): the registered quantized
file loaded once, one context, greedy, num_predict tokens at most, the model's stop parameters.
Printed as JSON: the load seconds, the generation seconds, the reply tokens, the replies that stopped.
No prompt cache is kept between requests (Ollama's runner reuses a common prefix; not measured).

--standin-port N also replays the same requests through a stand-in started on STORE at port N
(`--threads` threads; --standin-engine, default transformers; its llamacpp engine keeps the common
prompt prefix between requests, in whole 512-token batches), for its load and generation seconds in
the same command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "daemon")]

GENERATE = """
import { readFileSync } from "node:fs";
import { getLlama, LlamaCompletion } from "NODE_LLAMA_CPP";
const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
const started = performance.now();
const llama = await getLlama({ gpu: false, build: "never", logLevel: "error" });
const model = await llama.loadModel({ modelPath: spec.model });
const context = await model.createContext({ threads: spec.threads, contextSize: 4096 });
const sequence = context.getSequence();
const loaded = performance.now();
let replyTokens = 0, stopped = 0;
for (const c of spec.cases) {
  await sequence.clearHistory();
  const completion = new LlamaCompletion({ contextSequence: sequence });
  let n = 0;
  await completion.generateCompletion(model.tokenize(c.prompt, true), { maxTokens: c.max_tokens, temperature: 0,
    repeatPenalty: false, customStopTriggers: spec.stop, onToken: (chunk) => { n += chunk.length; } });
  replyTokens += n;
  if (n < c.max_tokens) stopped += 1;
}
console.log(JSON.stringify({ engine: "llama.cpp", cases: spec.cases.length, load_s: (loaded - started) / 1000,
  generate_s: (performance.now() - loaded) / 1000, reply_tokens: replyTokens, stopped }));
"""


def served_chats(store_dir: Path, model: str) -> list[dict]:
    """The bodies of the /api/chat requests with messages the stand-in served for `model`."""
    from ollama_standin import read_request_log

    return [r["body"] for r in read_request_log(store_dir) if r["path"] == "/api/chat"
            and r["body"].get("model") == model and r["body"].get("messages")]


def rendered_cases(manifest: dict, chats: list[dict]) -> list[dict]:
    """The prompts as the stand-in's /api/chat rendered them (its own chat_prompt)."""
    from ollama_standin import DEFAULT_NUM_PREDICT, chat_prompt

    return [{"prompt": chat_prompt(manifest, body["messages"]),
             "max_tokens": int((body.get("options") or {}).get("num_predict") or DEFAULT_NUM_PREDICT)}
            for body in chats]  # fmt: skip


def replay_standin(store_dir: Path, port: int, threads: int, chats: list[dict], model: str,
                   engine: str = "transformers") -> dict:
    """The same requests through a stand-in process on a scratch copy of the store (its request log
    stays as it was; the blobs are linked, not copied)."""
    import ollama

    scratch = Path(tempfile.mkdtemp(prefix="lacd-standin-"))
    shutil.copytree(store_dir / "manifests", scratch / "manifests")
    (scratch / "blobs").symlink_to((store_dir / "blobs").resolve())
    command = [sys.executable, str(ROOT / "tests" / "ollama_standin.py"), "--port", str(port), "--store", str(scratch),
               "--threads", str(threads), "--engine", engine]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = ollama.Client(host=f"http://127.0.0.1:{port}")
        for _ in range(300):
            try:
                client.list()
                break
            except Exception:  # not listening yet
                time.sleep(0.1)
        started = time.perf_counter()
        client.chat(model=model, messages=[])  # load
        loaded = time.perf_counter()
        tokens = 0
        for body in chats:
            tokens += client.chat(model=model, messages=body["messages"], options=body.get("options"),
                                  stream=False).eval_count or 0
        return {"engine": f"stand-in ({engine})", "cases": len(chats), "load_s": round(loaded - started, 1),
                "generate_s": round(time.perf_counter() - loaded, 1), "reply_tokens": tokens}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, type=Path, help="a stand-in's store folder")
    parser.add_argument("--model", default="lacd-coder:v1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--standin-port", type=int, default=0)
    parser.add_argument("--standin-engine", choices=("transformers", "llamacpp"), default="transformers")
    args = parser.parse_args()

    from ollama_standin import Store

    store = Store(args.store)
    manifest = store.get(args.model)
    chats = served_chats(args.store, args.model)
    if not chats:
        print(f"no /api/chat requests for {args.model} in {args.store / 'requests.jsonl'}", file=sys.stderr)
        return 1
    spec = {"model": str(store.blob_path(manifest["model"])), "threads": args.threads,
            "stop": (manifest.get("parameters") or {}).get("stop") or [],
            "cases": rendered_cases(manifest, chats)}
    library = ROOT / "tests" / "llamacpp" / "node_modules" / "node-llama-cpp" / "dist" / "index.js"
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "spec.json").write_text(json.dumps(spec))
        (Path(work) / "generate.mjs").write_text(GENERATE.replace("NODE_LLAMA_CPP", library.as_uri()))
        done = subprocess.run(["node", "generate.mjs", "spec.json"], text=True, capture_output=True, cwd=work,
                              check=False)
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        return 1
    print(done.stdout.strip().splitlines()[-1])
    if args.standin_port:
        print(json.dumps(replay_standin(args.store, args.standin_port, args.threads, chats, args.model,
                                        args.standin_engine)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
