"""llama.cpp (llama-cpp-python) in a child process, for the tests that compare against it.

A llama.cpp built for the wrong CPU dies with SIGILL; in the test process that would kill the whole
pytest run. Here it kills only the child, and the test that drove it fails with what happened.
Protocol: one JSON request per line on the child's stdin, one JSON reply per line on a private pipe.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys


class LlamaChild:
    def __init__(self, path, n_ctx: int = 64):
        read_fd, write_fd = os.pipe()
        self.proc = subprocess.Popen([sys.executable, __file__, str(path), str(n_ctx), str(write_fd)],
                                     stdin=subprocess.PIPE, pass_fds=(write_fd,), text=True)
        os.close(write_fd)
        self.replies = os.fdopen(read_fd, "r")
        self.call("ping")

    def call(self, op: str, **args):
        try:
            self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child is gone: say how below
        line = self.replies.readline()
        if not line:
            code = self.proc.wait(timeout=30)
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            raise RuntimeError(f"llama.cpp child process died with {how} during '{op}' "
                               "(SIGILL: llama-cpp-python was built for instructions this CPU cannot run; "
                               "rerun scripts/setup.sh)")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"llama.cpp child: {reply['error']}")
        return reply["result"]

    def tokenize(self, text: str) -> list[int]:
        return self.call("tokenize", text=text)

    def logits(self, ids: list[int]):
        import numpy as np

        return np.array(self.call("logits", ids=ids), dtype=np.float32)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        return self.call("greedy", ids=ids, n=n)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.replies.close()


def _serve(path: str, n_ctx: int, reply_fd: int) -> None:
    replies = os.fdopen(reply_fd, "w")
    os.dup2(2, 1)  # llama.cpp's own prints must not mix with the replies
    from llama_cpp import Llama

    llm = Llama(path, n_ctx=n_ctx, logits_all=True, n_threads=2, n_threads_batch=2, verbose=False)

    def greedy(ids, n):
        llm.reset()
        out = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(int(token))
            if len(out) == n:
                return out

    def logits(ids):
        llm.reset()
        llm.eval(ids)
        return [[float(v) for v in row] for row in llm.scores[: len(ids)]]

    ops = {"ping": lambda: "pong", "greedy": greedy, "logits": logits,
           "tokenize": lambda text: llm.tokenize(text.encode(), add_bos=False, special=True)}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            result = ops[request.pop("op")](**request)
            replies.write(json.dumps({"result": result}) + "\n")
        except Exception as e:  # a bad request is the test's error, reported to it; the child goes on
            replies.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        replies.flush()


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
