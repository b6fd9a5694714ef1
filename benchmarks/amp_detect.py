"""bfloat16 autocast in detection against float32, on the bundled model and the demo's lesioned Colin27: the
network's time (one thread), the largest difference of the reconstructions and of the anomaly maps, and how far
the detections at the calibrated 5% rate agree.

    OMP_NUM_THREADS=1 python benchmarks/amp_detect.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import time, numpy as np, torch, ra_engine
from ra_engine.preprocess.pipeline import preprocess
from ra_engine.demo import insert_lesion, TEST_SCAN
torch.set_num_threads(1)
model = ra_engine.load_model("brain-t1-demo", "cpu")
scan, truth = insert_lesion(ra_engine.read_image(TEST_SCAN))
slices = preprocess(scan, model.card.preset)
used = np.flatnonzero(slices.masks.reshape(len(slices), -1).any(1))
x = torch.from_numpy(slices.images[used]).unsqueeze(1).contiguous(memory_format=torch.channels_last)
net = model.inference_network
def run(amp):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        return net.reconstruct(x).float()
for amp in (False, True): run(amp)
times = {}
for amp in (False, True):
    t = time.perf_counter(); 
    for _ in range(3): r = run(amp)
    times[amp] = (time.perf_counter() - t) / 3
r32, r16 = run(False), run(True)
print("network s fp32 %.3f bf16 %.3f" % (times[False], times[True]), "rec max abs diff", float((r32 - r16).abs().max()))
scorer = ra_engine.make_scorer(model)
a32 = scorer.score(x, r32).anomaly; a16 = scorer.score(x, r16).anomaly
m = slices.masks[used]
print("A max abs diff %.3g, rel to A p99 %.3g" % (np.abs(a32 - a16)[m].max(), np.abs(a32-a16)[m].max() / np.percentile(a32[m], 99)))
thr = model.card.calibration.threshold(0.05)
d32, d16 = (a32 >= thr) & m, (a16 >= thr) & m
print("flagged", d32.sum(), d16.sum(), "dice %.4f" % (2 * (d32 & d16).sum() / (d32.sum() + d16.sum())))
print("cpu capability", torch.backends.cpu.get_cpu_capability())
