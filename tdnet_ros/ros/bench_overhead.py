"""Overhead of segmenter_node: its end-to-end latency minus the segmenter's own time.

Runs the node as its own process and a publisher/subscriber in this process, over DDS,
and sends camera frames one at a time (each after the previous frame's outputs arrived,
so nothing is dropped or queued). For each frame:

* ``segmenter``: the segmenter call as timed by the node (``SegmentationTiming.segment_ms``);
* ``node e2e``: image stamp (set just before publishing) to the node's publication of the
  outputs (``end_to_end_ms``): inbound DDS transport, deserialization, wait, decode,
  segmenter, rendering and publishing;
* ``client e2e``: image stamp to the label image arriving back in this process (adds the
  outbound DDS transport of the labels);
* overheads: the two end-to-end figures minus ``segmenter``.

    .venv/bin/python -m tdnet_ros.ros.bench_overhead --frames 100 --size 1280x720
    .venv/bin/python -m tdnet_ros.ros.bench_overhead --outputs all
    # GPU: td4-psp18 (random weights) at 1920x1080, CUDA graphs, 4 cameras triggered together
    .venv/bin/python -m tdnet_ros.ros.bench_overhead --device cuda --model td4-psp18 \
        --size 1920x1080 --precision float16 --cameras 4

With several cameras every frame goes to all of them at once (a rig triggered together);
the figures are over all cameras' frames. On CUDA the node's GPU memory (from its
diagnostics) is printed beside the size of the model's weights.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100, help="measured frames (after warm-up)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT of the rgb8 frames")
    parser.add_argument("--checkpoint", default="", help="default: random weights of --model")
    parser.add_argument("--model", default="td4-tiny", help="variant for the random weights (e.g. td4-psp18)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--backend", default="auto", help="node parameter backend (auto: cuda-graph on CUDA)")
    parser.add_argument("--engine-dir", default="", help="node parameter engine_dir")
    parser.add_argument("--preprocess", default="auto", choices=("auto", "cv2", "device"))
    parser.add_argument("--cameras", type=int, default=1, help="cameras, each sent every frame")
    parser.add_argument("--outputs", choices=("labels", "all"), default="labels",
                        help="subscribe to the label image only, or to every output")
    args = parser.parse_args(argv)

    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from tdnet_ros.ros.interfaces import load_messages
    from tdnet_ros.ros.testing import (
        GraphClient,
        diagnostics_values,
        NodeProcess,
        connect,
        make_image,
        make_tiny_checkpoint,
        pick_domain_id,
        stamp_ns,
    )

    msgs = load_messages()
    width, height = (int(v) for v in args.size.lower().split("x"))
    workdir = Path(tempfile.mkdtemp(prefix="tdnet_bench_"))
    domain = pick_domain_id()
    checkpoint = args.checkpoint or str(make_tiny_checkpoint(workdir / f"{args.model}.pt", args.model))
    topics = [f"/bench/cam{i}/image" for i in range(args.cameras)]
    outputs = [f"/bench/cam{i}/segmentation" for i in range(args.cameras)]
    parameters = dict(checkpoint=checkpoint, device=args.device, precision=args.precision, backend=args.backend,
                      engine_dir=args.engine_dir, preprocess=args.preprocess, cameras=f"[{','.join(topics)}]")
    ros_args = [arg for name, value in parameters.items() if value for arg in ("-p", f"{name}:={value}")]
    node = NodeProcess(ros_args, domain_id=domain, log_path=workdir / "node.log")
    endpoints: dict[str, list] = {}

    def build(client: GraphClient) -> list:
        endpoints["labels"] = [client.subscribe(Image, f"{out}/labels") for out in outputs]
        endpoints["timing"] = [client.subscribe(msgs.SegmentationTiming, f"{out}/timing") for out in outputs]
        endpoints["diagnostics"] = [client.subscribe(DiagnosticArray, "/diagnostics")]
        endpoints["others"] = []
        if args.outputs == "all":
            for out in outputs:
                endpoints["others"] += [client.subscribe(Image, f"{out}/color"), client.subscribe(Image, f"{out}/overlay"),
                                        client.subscribe(msgs.ClassMasks, f"{out}/masks")]
        endpoints["publishers"] = [client.publisher(Image, topic, qos_profile_sensor_data) for topic in topics]
        return endpoints["publishers"]

    client = None
    try:
        try:  # the warm-up (graph captures, compilation) comes before the subscriptions
            client = connect("overhead_bench", domain, node, build, timeout=300)
        except TimeoutError as error:
            raise SystemExit(str(error)) from None
        publishers, labels, timing = endpoints["publishers"], endpoints["labels"], endpoints["timing"]
        (diagnostics,), others = endpoints["diagnostics"], endpoints["others"]
        time.sleep(1.0)
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(4)]
        rows, batch_sizes = [], []
        for index in range(args.warmup + args.frames):
            message = make_image(frames[index % 4], stamp_ns=0, frame_id="bench")
            sent = time.time_ns()
            message.header.stamp.sec, message.header.stamp.nanosec = divmod(sent, 10**9)
            for publisher in publishers:
                publisher.publish(message)
            publish_ms = (time.time_ns() - sent) / 1e6
            for camera in range(args.cameras):
                label = labels[camera].wait_for(lambda m: stamp_ns(m.header.stamp) == sent, 30)
                received = time.time_ns()
                info = timing[camera].wait_for(lambda m: stamp_ns(m.header.stamp) == sent, 30)
                if label is None or info is None:
                    raise SystemExit(f"frame {index} of camera {camera} got no outputs:\n{node.log()[-2000:]}")
                if index >= args.warmup:
                    rows.append((info.segment_ms, info.end_to_end_ms, (received - sent) / 1e6,
                                 info.decode_ms, info.publish_ms, info.queue_ms, publish_ms, info.receive_ms))
                    batch_sizes.append(info.batch_size)
            time.sleep(0.02)
        data = np.array(rows)
        count = len(diagnostics.messages)
        diagnostics.wait_count(count + 1, 3.0)
        node_stages = diagnostics_values(diagnostics.messages[-1].status[0])
    finally:
        if client is not None:
            client.close()
        node.stop()
        node.kill()

    segment, node_e2e, client_e2e = data[:, 0], data[:, 1], data[:, 2]
    print(f"segmenter_node overhead, {args.frames} frames x {args.cameras} camera(s) of {width}x{height} rgb8 "
          f"over DDS (best effort in, FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA), outputs subscribed: {args.outputs}")
    print(f"machine: {platform.processor() or platform.machine()}, {platform.platform()}, "
          f"device {args.device}, checkpoint {checkpoint}")
    print(f"node: backend {args.backend}, precision {args.precision}, preprocess {args.preprocess}; "
          f"segmenter batch sizes seen: {sorted(set(batch_sizes))}")
    if "gpu_memory_peak_mb" in node_stages:
        weights = float(node_stages["model_weights_mb"])
        peak = float(node_stages["gpu_memory_peak_mb"])
        print(f"GPU memory of the node: weights {weights:.1f} MB, peak allocated {peak:.1f} MB "
              f"({peak - weights:.1f} MB beyond the weights), reserved {float(node_stages['gpu_memory_reserved_mb']):.1f} MB")
    print(f"{'ms':<44}{'p50':>9}{'p95':>9}{'mean':>9}")
    for name, values in (
        ("segmenter (segment_ms)", segment),
        ("node e2e: stamp -> node publish", node_e2e),
        ("client e2e: stamp -> labels here", client_e2e),
        ("overhead: node e2e - segmenter", node_e2e - segment),
        ("overhead: client e2e - segmenter", client_e2e - segment),
        ("  of which decode", data[:, 3]),
        ("  of which render+publish", data[:, 4]),
        ("  of which wait for worker", data[:, 5]),
        ("  of which stamp -> node callback", data[:, 7]),
        ("    of which the camera's publish()", data[:, 6]),
        ("node only: callback -> publish - segmenter", node_e2e - data[:, 7] - segment),
    ):
        p50, p95 = np.percentile(values, [50, 95])
        print(f"{name:<44}{p50:>9.2f}{p95:>9.2f}{values.mean():>9.2f}")
    print("per output (node diagnostics, last 300 frames incl. warm-up):")
    for key, value in sorted(node_stages.items()):
        if key.startswith("latency_ms/output/") and key.endswith("/p50"):
            name = key[len("latency_ms/output/"):-len("/p50")]
            p95 = node_stages[key[:-4] + "/p95"]
            print(f"  {name:<42}{float(value):>9.2f}{float(p95):>9.2f}")
    for recorder in others:
        assert recorder.messages, "an output subscribed to never arrived"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
