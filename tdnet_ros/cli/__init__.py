"""The console scripts (setup.py's entry points), each a thin layer of flags over the core:

    tdnet-eval           evaluate.py       tdnet-bench    bench.py
    tdnet-demo           demo.py           tdnet-train    train.py
    tdnet-generate       generate.py       tdnet-recipe   recipe.py
    tdnet-build-engines  build_engines.py

`segmenter_node` is the ROS layer's (tdnet_ros.ros.entry). Nothing in the core imports
this package.
"""
