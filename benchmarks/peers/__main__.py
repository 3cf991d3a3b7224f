"""`python -m benchmarks.peers install NAME` / `start NAME` (start runs until Ctrl-C)."""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks.peers import PEERS, peer_module
from benchmarks.peers.base import PeerUnavailable, exit_on_sigterm


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__)
    parser.add_argument("action", choices=["install", "start", "list"])
    parser.add_argument("name", nargs="?", choices=list(PEERS))
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    exit_on_sigterm()
    if args.action == "list":
        for name, (_, kind) in PEERS.items():
            print(f"{name:10} {kind:15} installed={peer_module(name).is_installed()}")
        return 0
    if args.name is None:
        parser.error("NAME is required")
    module = peer_module(args.name)
    try:
        if args.action == "install":
            print(module.install())
            return 0
        handle = module.start(port=args.port)
    except PeerUnavailable as error:
        print(f"{args.name}: {error}", file=sys.stderr)
        return 1
    print(f"{args.name} ready at {handle.base_url} (model {handle.model}); Ctrl-C stops it", flush=True)
    try:
        while handle.is_alive():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
