"""Run specs: the Pydantic models a spec.yaml is validated against, `load_spec()` and `SpecError`.

One spec describes one run; the same resolved spec reaches the runtime locally and in a pod.
This package imports nothing else of barlow (it is the bottom of the house). Its rooms, lowest first:
plugins (the plug-in tables), base (Section, URL and quantity checks), data, sections, cluster, evaluation,
run (RunSpec, PretrainSpec, EvalRunSpec), errors (SpecError, did-you-mean), load (YAML, --set, dump, schema), stages.
"""

from barlow.spec.base import KNOWN_SCHEMES, QUANTITY, READABLE_SCHEMES, WRITABLE_SCHEMES, Quantity, ReadURL, Section, check_url
from barlow.spec.cluster import (
    BARLOW_LABEL_PREFIXES,
    DNS_1035,
    DNS_1123_LABEL,
    ENV_NAME,
    K8S_NAME,
    LABEL_VALUE,
    MULTUS_NETWORKS,
    POD_NAMESPACE_ENV,
    QUALIFIED_NAME,
    RENDERED_BY_ENV,
    RESERVED_ENV,
    RESERVED_MOUNTS,
    SECRET_LIKE,
    SPEC_ENV,
    ClusterSpec,
    EmptyDirSpec,
    KeyRef,
    NFSSpec,
    VolumeSpec,
)
from barlow.spec.data import AugmentSpec, DataSpec, LabelledDataSpec, S3Spec
from barlow.spec.errors import SpecError
from barlow.spec.evaluation import EvalClusterSpec, EvalRuntimeSpec, EvalSpec, FollowUpEvalSpec
from barlow.spec.load import (
    OVERRIDE_HELP,
    REMOVE,
    DuplicateKey,
    dump_spec,
    json_schema,
    load_spec,
    loads_spec,
    parse_override,
    parse_spec,
    set_path,
    with_fields,
)
from barlow.spec.plugins import ARCHS, BACKENDS, DATA_FORMATS, EVAL_PROTOCOLS, MONITORS
from barlow.spec.run import AnySpec, EvalRunSpec, PretrainSpec, RunSpec
from barlow.spec.sections import MlflowSpec, ModelSpec, MonitorSpec, OptimSpec, OutputSpec, RuntimeSpec
from barlow.spec.stages import STAGE_HELP, UNLABELLED_EVAL, Stage, follow_up_eval, stage_runs

__all__ = [
    "ARCHS", "BACKENDS", "BARLOW_LABEL_PREFIXES", "DATA_FORMATS", "DNS_1035", "DNS_1123_LABEL", "ENV_NAME", "EVAL_PROTOCOLS",
    "K8S_NAME", "KNOWN_SCHEMES", "LABEL_VALUE", "MONITORS", "MULTUS_NETWORKS", "OVERRIDE_HELP", "POD_NAMESPACE_ENV",
    "QUALIFIED_NAME", "QUANTITY", "READABLE_SCHEMES", "REMOVE", "RENDERED_BY_ENV", "RESERVED_ENV", "RESERVED_MOUNTS",
    "SECRET_LIKE", "SPEC_ENV", "STAGE_HELP", "UNLABELLED_EVAL", "WRITABLE_SCHEMES",
    "AnySpec", "AugmentSpec", "ClusterSpec", "DataSpec", "DuplicateKey", "EmptyDirSpec", "EvalClusterSpec", "EvalRunSpec",
    "EvalRuntimeSpec", "EvalSpec", "FollowUpEvalSpec", "KeyRef", "LabelledDataSpec", "MlflowSpec", "ModelSpec",
    "MonitorSpec", "NFSSpec", "OptimSpec", "OutputSpec", "PretrainSpec", "Quantity", "ReadURL", "RunSpec", "RuntimeSpec",
    "S3Spec", "Section", "SpecError", "Stage", "VolumeSpec",
    "check_url", "dump_spec", "follow_up_eval", "json_schema", "load_spec", "loads_spec", "parse_override", "parse_spec",
    "set_path", "stage_runs", "with_fields",
]
