"""The parser worker process (see ``parser.ParserPool``): one JSON-encoded query text per line
in, PostHog's parser's JSON answer per line out."""

from __future__ import annotations

import json
import sys

from tracer.sandbox.posthog.parser import parse_select_text


def main() -> None:
    for line in sys.stdin.buffer:
        answer = parse_select_text(json.loads(line))
        sys.stdout.write(answer.replace("\n", " ") + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
