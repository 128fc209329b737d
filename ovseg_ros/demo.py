"""ovseg-demo: the embedded default. Starts the real node and a synthetic camera as separate ROS 2 processes,
sets the vocabulary over the service, scores each segmentation against the camera's ground truth, writes
overlay PNGs and prints a per-frame summary.

    ovseg-demo [--frames 8] [--out demo_output] [--clip ovseg-demo-clip] [--cameras 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from .core.cameras import default_camera_names
from .runtime import Process, node_command, ros_environment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=8, help="frames to score (per camera)")
    parser.add_argument("--out", default="demo_output", help="folder for overlay PNGs and summary.json")
    parser.add_argument("--clip", default="ovseg-demo-clip", help="CLIP model (manifest name or ARCH:/path)")
    parser.add_argument("--rate", type=float, default=2.0, help="camera frames per second")
    parser.add_argument("--refinement", default="none", choices=["none", "guided", "sam"],
                        help="dense refinement (sam: SAM masks from the dense regions)")
    parser.add_argument("--pamr-steps", type=int, default=None,
                        help="PAMR iterations (default: the demo preset's 10, the demo CLIP's best setting)")
    parser.add_argument("--cameras", type=int, default=1,
                        help="N > 1: N synthetic cameras (front, rear, ...) served by one node and one model")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    domain = random.Random(os.getpid()).randint(30, 200)
    os.environ.update(ros_environment(domain_id=domain, log_dir=tempfile.mkdtemp(prefix="ovseg-demo-")))
    env = dict(os.environ)
    names = default_camera_names(args.cameras)
    params = {"preset": "demo", "clip_model": args.clip, "refinement": args.refinement}
    if args.pamr_steps is not None:
        params["pamr_steps"] = args.pamr_steps
    if names != [""]:
        params["cameras"] = names
    node = Process(node_command("ovseg_ros.node", "ovseg", params=params), env, out / "ovseg_node.log")
    # Each camera waits until the node and this demo subscribe, so the same scenes are scored on every run.
    cameras = [Process(node_command("ovseg_ros.synthetic_camera", "synthetic_camera", namespace=name or None,
                                    params={"rate_hz": args.rate, "seed": 900_000 + 1000 * i,
                                            "wait_for_subscribers": 2,
                                            "frame_id": f"{name or 'synthetic'}_camera_optical"}),
                       env, out / (f"{name}_camera.log" if name else "camera.log"))
               for i, name in enumerate(names)]
    print(f"[demo] ROS_DOMAIN_ID={domain}; node and {len(cameras)} camera(s) started (logs in {out}/)", flush=True)
    try:
        return run_demo(args, out, node, names)
    finally:
        for proc in (*cameras, node):
            code = proc.stop()
            if code not in (0, None):
                print(f"[demo] {' '.join(proc.cmd[2:3])} exited with {code}; see {proc.log_path}", file=sys.stderr)


def run_demo(args, out: Path, node: Process, names: list[str]) -> int:
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from .client import OvsegClient
    from .core.metrics import ConfusionMatrix
    from .synth.world import world_vocabulary

    clients = {name: OvsegClient("", name=f"ovseg_demo_{i}", camera=name,
                                 extra_topics={"ground_truth/labels": Image}) for i, name in enumerate(names)}
    first = clients[names[0]]
    try:
        if not first.wait_ready(timeout=args.timeout):
            print("[demo] the node did not come up:\n" + node.output()[-3000:], file=sys.stderr)
            return 1
        vocab = world_vocabulary()
        response = first.set_vocabulary(vocab)
        print(f"[demo] set_vocabulary: success={response.success} '{response.message}'", flush=True)
        if not response.success:
            return 1
        for client in clients.values():
            client.clear()
            client.subscribe("image", Image, qos_profile_sensor_data)  # the camera starts once this subscribes
        total = ConfusionMatrix(len(vocab))
        rows: dict[str, list[dict]] = {name: [] for name in names}
        scored: dict[str, set] = {name: set() for name in names}
        deadline = time.monotonic() + args.timeout
        while any(len(r) < args.frames for r in rows.values()) and time.monotonic() < deadline:
            for name, client in clients.items():
                if len(rows[name]) >= args.frames:
                    continue
                row = score_next_frame(client, name, response.vocabulary_version, scored[name], vocab, total,
                                       out, len(rows[name]), timeout=5.0 / len(names))
                if row is not None:
                    rows[name].append(row)
                elif not node.alive():
                    print("[demo] the node died:\n" + node.output()[-3000:], file=sys.stderr)
                    return 1
        everything = [row for name in names for row in rows[name]]
        if not everything:
            print("[demo] no segmentation arrived", file=sys.stderr)
            return 1
        summary = {
            "frames": len(everything),
            "cameras": [name for name in names if name],
            "mean_frame_miou": round(float(np.mean([r["miou"] for r in everything])), 3),
            "dataset_miou": round(total.mean_iou(), 3),
            "pixel_accuracy": round(total.pixel_accuracy(), 3),
            "median_inference_ms": round(float(np.median([r["inference_ms"] for r in everything])), 1),
            "vocabulary_version": response.vocabulary_version,
            "classes": len(vocab),
            "rows": everything,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"[demo] {len(everything)} frames: mean per-frame mIoU {summary['mean_frame_miou']:.3f}, "
              f"pooled mIoU {summary['dataset_miou']:.3f}, pixel accuracy {summary['pixel_accuracy']:.3f}, "
              f"median inference {summary['median_inference_ms']:.0f} ms; overlays (camera | overlay | truth) "
              f"in {out}/", flush=True)
        return 0
    finally:
        for client in clients.values():
            client.close()


def score_next_frame(client, name: str, version: int, scored: set, vocab: list[str], total, out: Path,
                     index: int, timeout: float) -> dict | None:
    """Wait for the camera's next unscored segmentation, score it against its ground truth, save the panel."""
    from .core.metrics import ConfusionMatrix
    from .core.overlay import colourise
    from .core.pipeline import frame_key
    from .ros.image_conversions import image_to_array

    seg = client.wait_for("segmentation", lambda m: m.vocabulary_version == version
                          and frame_key(m.header.stamp) not in scored, timeout=timeout)
    if seg is None:
        return None
    stamp = frame_key(seg.header.stamp)
    scored.add(stamp)

    def same(m):
        return frame_key(m.header.stamp) == stamp

    truth_msg = client.wait_for("ground_truth/labels", same, timeout=2.0)
    image_msg = client.wait_for("image", same, timeout=2.0)
    overlay_msg = client.wait_for("overlay", same, timeout=2.0)
    if truth_msg is None or image_msg is None:
        return None
    truth = image_to_array(truth_msg)
    pred = image_to_array(seg.labels)
    frame = ConfusionMatrix(len(vocab))
    frame.add(truth, pred)
    total.add(truth, pred)
    row = {
        "camera": name,
        "frame": index,
        "stamp": f"{stamp[0]}.{stamp[1]:09d}",
        "miou": round(frame.mean_iou(), 3),
        "pixel_accuracy": round(frame.pixel_accuracy(), 3),
        "inference_ms": round(seg.inference_ms, 1),
        "predicted": ", ".join(n for n, a in zip(seg.class_names, seg.class_areas, strict=True) if a > 0.01),
        "truth": ", ".join(vocab[i] for i in np.unique(truth)),
    }
    panels = [image_to_array(image_msg)]
    if overlay_msg is not None:
        panels.append(image_to_array(overlay_msg))
    panels.append(colourise(truth, len(vocab)))
    prefix = f"{name}_" if name else ""
    cv2.imwrite(str(out / f"{prefix}frame_{index:02d}.png"), cv2.cvtColor(np.hstack(panels), cv2.COLOR_RGB2BGR))
    where = f"{name} " if name else ""
    print(f"[demo] {where}frame {index}: mIoU {row['miou']:.3f}  pixel acc {row['pixel_accuracy']:.3f}  "
          f"{row['inference_ms']:.0f} ms  predicted [{row['predicted']}]  truth [{row['truth']}]", flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
