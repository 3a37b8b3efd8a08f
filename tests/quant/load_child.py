"""Run in a child process by the crafted-folder tests: load MODEL and decode a few tokens, so every
kernel (matmuls, RMSNorm, the fused attention and the decode stack) sees the loaded tensors.

Exit 0 and "decoded N" on success; a QwenlabError is one "error: ..." line on stderr and exit 2, as
the CLI prints it. A kernel reading out of bounds would kill this process with a signal instead,
which is what the parent test tells apart.
"""

import sys

from qwenlab.errors import QwenlabError
from qwenlab.loading import load
from qwenlab.model import GenerationConfig
from qwenlab.model.generate import generate_token_ids


def main(folder: str) -> int:
    try:
        model = load(folder).model
        steps = list(generate_token_ids(model, [[1, 2, 3, 4], [5, 6, 7, 8]], GenerationConfig(max_new_tokens=3), set()))
    except QwenlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    assert all(isinstance(token, int) for step in steps for token in step)
    print(f"decoded {len(steps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
