"""`ovseg-bench precision` runs both precisions on the demo world and writes its figures."""

from __future__ import annotations

import json

from ovseg_ros.bench.precision import main


def test_precision_benchmark_compares_bf16_with_fp32(tmp_path):
    out = tmp_path / "precision.json"
    assert main(["--scenes", "2", "--json", str(out)]) == 0  # 640x480, where bf16 was measured
    figures = json.loads(out.read_text())
    assert figures["scenes"] == 2 and figures["size"] == [480, 640]
    assert 0.99 < figures["labels_equal_min"] <= figures["labels_equal_mean"] <= 1.0
    assert figures["fp32_ms"] > 0 and figures["bf16_ms"] > 0
