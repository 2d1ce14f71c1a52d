"""Times `llooma hosts add` and `revoke` as the CLI does them (issue or withdraw, then verify by
connecting; a revoke also closes live connections) on a running embedded server:
`.venv/bin/python -m tests.support.admission_bench --hosts 200`. Run against an older checkout's
`libs` (PYTHONPATH) it times that admission the same way, for a side-by-side figure."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from llooma import admission
from llooma.credentials import CredentialStore
from llooma.embedded import EmbeddedNats


def median_ms(seconds: list[float]) -> str:
    return f"{1000 * statistics.median(seconds):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=200)
    parser.add_argument("--revokes", type=int, default=20)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llooma-admission-bench-"))
    store = CredentialStore(root / "credentials")
    server = EmbeddedNats.start(root / "nats", credentials=store)
    adds: list[float] = []
    revokes: list[float] = []
    try:
        for index in range(args.hosts):
            started = time.monotonic()
            seed = store.issue(f"h{index}").read_text().strip()
            outcome = admission.apply(root, seed, admitted=True)
            adds.append(time.monotonic() - started)
            assert outcome.ok, outcome.message
        for index in range(min(args.revokes, args.hosts)):
            seed = store.seed_path(f"h{index}").read_text().strip()
            started = time.monotonic()
            store.revoke(f"h{index}")
            outcome = admission.apply(root, seed, admitted=False)
            revokes.append(time.monotonic() - started)
            assert outcome.ok, outcome.message
    finally:
        server.stop()
    print(
        f"{args.hosts} adds in {sum(adds):.2f} s; median add: first 50 {median_ms(adds[:50])} ms, "
        f"last 50 {median_ms(adds[-50:])} ms; median revoke {median_ms(revokes)} ms; "
        f"server config {(root / 'nats' / 'nats.conf').stat().st_size} bytes; "
        f"load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
