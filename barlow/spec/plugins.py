"""The plug-ins, by kind: the value a spec field accepts -> the module that implements it, imported on first use (most
need torch; the spec and the CLI image never import them). Adding a plug-in is its module and its line here; a rule
that belongs to one plug-in sits beside the section it constrains, with a comment naming the plug-in."""

# model.arch: the ResNets barlow.model.ARCHS builds (its keys, written again here: the spec imports no torch)
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2")
BACKENDS = {"pytorchjob": "barlow.launch.pytorchjob", "trainjob": "barlow.launch.trainjob"}  # cluster.backend
EVAL_PROTOCOLS = {"linear": "barlow.evaluate.linear", "finetune": "barlow.evaluate.finetune"}  # eval.mode
# Training monitors: each module builds its monitor from the spec (None when its settings turn it off).
MONITORS = ("barlow.monitors.probe", "barlow.monitors.knn", "barlow.monitors.rank")
DATA_FORMATS = {  # data.format
    "imagefolder": "barlow.data.imagefolder",
    "shards": "barlow.data.shardreader",
    "webdataset": "barlow.data.shardreader",
    "parquet": "barlow.data.shardreader",
}
