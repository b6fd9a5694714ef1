"""Stand-in engines for the launcher tests, run as `python -m RALogic.worker STATUS engine_standins KIND`: they
announce themselves with a `start` event, then wait, never looking at their stop file. `polite` stops cleanly with
exit status 130 on SIGTERM (as `ra train` does); `stubborn` ignores SIGTERM (an engine stuck in a long step)."""
import json
import signal
import sys
import time

if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "polite":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(json.dumps({"event": "start", "message": kind}), flush=True)
    time.sleep(600)
