"""A bounded load for an SGLang server started with ``--skip-tokenizer-init``: requests carry
``input_ids``. Groups of requests share a prompt prefix (SGLang's radix cache reuses it), prompts
are long enough to be prefilled in chunks, and several run at once, so that a small KV pool makes
requests queue (and, with ``SGLANG_TEST_RETRACT=1``, be retracted).

    python tests/sglang_server/load.py --port 31000 --requests 40 --concurrency 8

Bounded in count (``--requests``) and time (``--timeout`` per request, ``--deadline`` for all);
stdlib only. Prints one JSON line: requests sent, completed, failed, tokens generated, seconds.
Exits 0 when every request completed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request


def prompts(count: int, vocab: int, seed: int) -> list:
    """``count`` prompts in groups of 4 sharing a 24-token prefix; each adds 8 to 56 tokens of its own."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if i % 4 == 0:
            prefix = [rng.randrange(3, vocab) for _ in range(24)]
        out.append(prefix + [rng.randrange(3, vocab) for _ in range(rng.randrange(8, 57))])
    return out


def generate(url: str, input_ids: list, max_new_tokens: int, timeout: float) -> dict:
    body = json.dumps({"input_ids": input_ids, "sampling_params": {
        "max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}).encode()
    request = urllib.request.Request(url + "/generate", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def run(url: str, requests: int, concurrency: int, max_new_tokens: int, vocab: int, timeout: float,
        deadline: float, seed: int = 0) -> dict:
    todo = list(enumerate(prompts(requests, vocab, seed)))
    lock = threading.Lock()
    stats = {"sent": 0, "completed": 0, "failed": 0, "tokens": 0, "errors": []}
    end = time.monotonic() + deadline

    def worker():
        while time.monotonic() < end:
            with lock:
                if not todo:
                    return
                _, ids = todo.pop(0)
                stats["sent"] += 1
            try:
                out = generate(url, ids, max_new_tokens, min(timeout, max(1.0, end - time.monotonic())))
                with lock:
                    stats["completed"] += 1
                    stats["tokens"] += len(out.get("output_ids", []))
            except (urllib.error.URLError, OSError, ValueError) as exc:
                with lock:
                    stats["failed"] += 1
                    stats["errors"].append(f"{type(exc).__name__}: {exc}"[:200])

    start = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, end - time.monotonic()) + 1)
    stats["seconds"] = round(time.monotonic() - start, 2)
    stats["errors"] = stats["errors"][:5]
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=512, help="token ids are drawn below this")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds for the whole load")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    stats = run(f"http://{args.host}:{args.port}", args.requests, args.concurrency, args.max_new_tokens,
                args.vocab, args.timeout, args.deadline, args.seed)
    print(json.dumps(stats), flush=True)
    return 0 if stats["completed"] == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
