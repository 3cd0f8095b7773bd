"""repository/config.py: config.pbtxt parsing, version policy, completion from the
model's own signature, and the /config JSON."""

import pytest
from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from tritonclient.grpc import model_config_pb2 as mc

from batchgate.backends.base import IOInfo
from batchgate.core.errors import ModelConfigError as ConfigError
from batchgate.repository.config import (
    batch_doubts,
    complete_config,
    config_to_json,
    read_config,
    signature_of,
    versions_to_serve,
)

PBTXT = """
name: "resnet"
platform: "onnxruntime_onnx"
max_batch_size: 16
version_policy: { latest: { num_versions: 2 } }
input [ { name: "image" data_type: TYPE_FP32 dims: [ 3, 224, 224 ] } ]
output [ { name: "probs" data_type: TYPE_FP32 dims: [ 1000 ] } ]
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 500 }
instance_group [ { count: 2 kind: KIND_CPU } ]
"""


def model_dir(tmp_path, name, text=None):
    d = tmp_path / name
    d.mkdir()
    if text is not None:
        (d / "config.pbtxt").write_text(text)
    return str(d)


# ---------------------------------------------------------------- read_config
def test_read_config_parses_pbtxt(tmp_path):
    cfg = read_config(model_dir(tmp_path, "resnet", PBTXT), "resnet")
    assert cfg.name == "resnet"
    assert cfg.max_batch_size == 16
    assert cfg.version_policy.latest.num_versions == 2
    assert [(i.name, mc.DataType.Name(i.data_type), list(i.dims)) for i in cfg.input] == [
        ("image", "TYPE_FP32", [3, 224, 224])
    ]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert cfg.instance_group[0].count == 2


def test_read_config_name_mismatch_is_an_error(tmp_path):
    d = model_dir(tmp_path, "other", PBTXT)
    with pytest.raises(ConfigError) as ei:
        read_config(d, "other")
    assert "'resnet'" in str(ei.value) and "'other'" in str(ei.value)


def test_read_config_without_a_name_takes_the_directory_name(tmp_path):
    cfg = read_config(model_dir(tmp_path, "dirname", "max_batch_size: 4\n"), "dirname")
    assert cfg.name == "dirname" and cfg.max_batch_size == 4


def test_read_config_without_a_file_is_empty(tmp_path):
    cfg = read_config(model_dir(tmp_path, "bare"), "bare")
    assert cfg.name == "bare" and not cfg.input and cfg.max_batch_size == 0


def test_read_config_syntax_error_names_the_file(tmp_path):
    d = model_dir(tmp_path, "broken", "max_batch_size: lots\n")
    with pytest.raises(ConfigError) as ei:
        read_config(d, "broken")
    assert "config.pbtxt" in str(ei.value) and "max_batch_size" in str(ei.value)


def test_a_config_file_that_cannot_be_read_as_text_names_the_model_and_the_file(tmp_path):
    """Bytes that are not UTF-8, or a directory where the file should be: the load's reason named
    neither the model nor the file ("'utf-8' codec can't decode byte 0xff ...")."""
    d = model_dir(tmp_path, "latin")
    (tmp_path / "latin" / "config.pbtxt").write_bytes(b'max_batch_size: 8\nname: "caf\xe9"\n')
    with pytest.raises(ConfigError) as ei:
        read_config(d, "latin")
    assert str(ei.value) == "model 'latin': config.pbtxt is not UTF-8 text (byte 0xe9 at offset 28); save it as UTF-8"
    d = model_dir(tmp_path, "folder")
    (tmp_path / "folder" / "config.pbtxt").mkdir()
    with pytest.raises(ConfigError) as ei:
        read_config(d, "folder")
    assert str(ei.value) == "model 'folder': config.pbtxt cannot be read: Is a directory"


# ---------------------------------------------------------------- versions_to_serve
def policy(text: str) -> mc.ModelConfig:
    cfg = mc.ModelConfig()
    text_format.Parse(text, cfg)
    return cfg


@pytest.mark.parametrize(
    "text,available,expected",
    [
        ("", [3, 1, 2], [3]),  # default: the latest one
        ("version_policy { latest { num_versions: 2 } }", [1, 10, 2], [2, 10]),
        ("version_policy { latest { num_versions: 5 } }", [2, 1], [1, 2]),
        ("version_policy { latest { num_versions: 0 } }", [1, 2], [2]),
        ("version_policy { all {} }", [3, 1, 2], [1, 2, 3]),
        ("version_policy { specific { versions: [1, 3, 7] } }", [1, 2, 3], [1, 3]),
        ("version_policy { specific { versions: [9] } }", [1, 2], []),
        ("version_policy { latest { num_versions: 2 } }", [], []),
        ("version_policy { all {} }", [], []),
    ],
)
def test_versions_to_serve(text, available, expected):
    assert versions_to_serve(policy(text), available) == expected


# ---------------------------------------------------------------- complete_config
def io(name, dt, *shape):
    return IOInfo(name, dt, tuple(shape))


def names_types_dims(entries):
    return [(e.name, mc.DataType.Name(e.data_type), list(e.dims)) for e in entries]


def test_complete_empty_config_with_dynamic_first_dims_batches():
    cfg = mc.ModelConfig(name="m")
    done = complete_config(
        cfg,
        "onnxruntime_onnx",
        [io("x", "FP32", -1, 3, -1), io("ids", "INT64", -1)],
        [io("y", "FP16", -1, 10)],
        default_max_batch_size=8,
    )
    assert done.max_batch_size == 8
    assert names_types_dims(done.input) == [("x", "TYPE_FP32", [3, -1]), ("ids", "TYPE_INT64", [])]
    assert names_types_dims(done.output) == [("y", "TYPE_FP16", [10])]
    assert done.platform == "onnxruntime_onnx" and done.backend == "onnxruntime"
    assert [(g.count, g.kind) for g in done.instance_group] == [(1, mc.ModelInstanceGroup.KIND_CPU)]
    assert done.HasField("dynamic_batching")  # as Triton's backends complete it: the batcher, its defaults
    assert done.dynamic_batching == mc.ModelDynamicBatching()
    assert not cfg.input and cfg.max_batch_size == 0  # the given config is not changed


def test_completion_adds_the_dynamic_batcher_only_where_the_config_chose_no_scheduler():
    tensors = ([io("x", "FP32", -1, 3)], [io("y", "FP32", -1)])
    given = mc.ModelConfig(name="m")
    given.dynamic_batching.max_queue_delay_microseconds = 700
    done = complete_config(given, "onnxruntime_onnx", *tensors, default_max_batch_size=8)
    assert done.max_batch_size == 8 and done.dynamic_batching.max_queue_delay_microseconds == 700
    given = mc.ModelConfig(name="m")
    given.sequence_batching.SetInParent()
    done = complete_config(given, "onnxruntime_onnx", *tensors, default_max_batch_size=8)
    assert done.WhichOneof("scheduling_choice") == "sequence_batching"
    done = complete_config(mc.ModelConfig(name="m"), "onnxruntime_onnx", *tensors, default_max_batch_size=1)
    assert done.max_batch_size == 1 and done.WhichOneof("scheduling_choice") is None
    done = complete_config(mc.ModelConfig(name="m", max_batch_size=4), "onnxruntime_onnx", *tensors, 8)
    assert done.WhichOneof("scheduling_choice") is None  # a max_batch_size the config gave: its own choice


def test_complete_with_a_fixed_first_dim_does_not_batch():
    done = complete_config(
        mc.ModelConfig(name="m"),
        "onnxruntime_onnx",
        [io("x", "FP32", -1, 3)],
        [io("y", "FP32", 1, 3)],
        default_max_batch_size=8,
    )
    assert done.max_batch_size == 0
    assert names_types_dims(done.input) == [("x", "TYPE_FP32", [-1, 3])]
    assert names_types_dims(done.output) == [("y", "TYPE_FP32", [1, 3])]


def named(name, *dims):
    return IOInfo(
        name,
        "FP32",
        tuple(d if isinstance(d, int) else -1 for d in dims),
        tuple(d if isinstance(d, str) else None for d in dims),
    )


@pytest.mark.parametrize(
    "inputs,outputs,not_batch,unsure",
    [
        ([named("x", "N", "M")], [named("y", "N", "M")], {}, []),
        (
            [named("x", "N", "M")],
            [named("y", "M", "N")],
            {"y": "output 'y' has first dimension 'M', dimension 1 of input 'x'"},
            [],
        ),
        ([named("x", "N", "M")], [named("y", "a"), named("z", None, 3), named("s")], {}, ["y", "z", "s"]),
        ([named("x", "N", 3)], [named("y", 1, 3)], {}, []),  # fixed: refused on its own rule
        ([named("a", "N", 3), named("b", "N", 3)], [named("y", "N")], {}, []),
        ([named("a", "N", 3), named("b", "M", 3)], [named("y", "N", "M")], {}, []),  # inputs named apart
        ([IOInfo("x", "FP32", (-1, 3))], [IOInfo("y", "FP32", (-1,))], {}, ["y"]),  # no names (TorchScript)
        (
            [named("x", "N", "M\n")],
            [named("y", "M\n")],
            {"y": "output 'y' has first dimension 'M\\x0a', dimension 1 of input 'x'"},
            [],
        ),
    ],
)
def test_batch_doubts_read_the_dimension_names(inputs, outputs, not_batch, unsure):
    assert batch_doubts(inputs, outputs) == (not_batch, unsure)


def test_completion_does_not_batch_outputs_that_are_not_the_batch_and_a_config_that_does_is_refused():
    tensors = ([named("x", "N", "M")], [named("y", "M", "N")])
    assert complete_config(mc.ModelConfig(name="m"), "onnxruntime_onnx", *tensors, 8).max_batch_size == 0
    with pytest.raises(
        ConfigError, match="output 'y' has first dimension 'M', dimension 1 of input 'x', not the batch"
    ):
        complete_config(mc.ModelConfig(name="m", max_batch_size=4), "onnxruntime_onnx", *tensors, 8)
    # inputs named apart (torch's list form of dynamic_axes, tf2onnx) batch as before
    pair = ([named("a", "N", 3), named("b", "M", 3)], [named("y", "N", "M")])
    assert complete_config(mc.ModelConfig(name="m"), "onnxruntime_onnx", *pair, 8).max_batch_size == 8


def test_complete_with_batching_turned_off_by_default_max_batch_size_zero():
    done = complete_config(
        mc.ModelConfig(name="m"),
        "onnxruntime_onnx",
        [io("x", "FP32", -1, 3)],
        [io("y", "FP32", -1)],
        default_max_batch_size=0,
    )
    assert done.max_batch_size == 0
    assert list(done.input[0].dims) == [-1, 3]


def test_complete_keeps_a_given_max_batch_size_and_fills_types_and_dims():
    cfg = mc.ModelConfig(name="m", max_batch_size=4)
    cfg.input.add(name="x")  # no type, no dims
    cfg.input.add(name="z", data_type=mc.TYPE_INT32, dims=[7])
    done = complete_config(
        cfg,
        "onnxruntime_onnx",
        [io("x", "BOOL", -1, 2), io("z", "INT32", -1, -1)],
        [io("y", "BYTES", -1, 1)],
        default_max_batch_size=8,
    )
    assert done.max_batch_size == 4
    assert names_types_dims(done.input) == [("x", "TYPE_BOOL", [2]), ("z", "TYPE_INT32", [7])]
    assert names_types_dims(done.output) == [("y", "TYPE_STRING", [1])]


def test_complete_datatype_mismatch_is_an_error():
    cfg = mc.ModelConfig(name="m", max_batch_size=4)
    cfg.input.add(name="x", data_type=mc.TYPE_FP16, dims=[2])
    with pytest.raises(ConfigError) as ei:
        complete_config(cfg, "onnxruntime_onnx", [io("x", "FP32", -1, 2)], [], 8)
    msg = str(ei.value)
    assert "'m'" in msg and "'x'" in msg and "TYPE_FP16" in msg and "TYPE_FP32" in msg


@pytest.mark.parametrize(
    "config, model_inputs, words",
    [
        # max_batch_size on a model whose first dimension is fixed (Triton refuses it too)
        ("max_batch_size: 8 input [{name: 'x' data_type: TYPE_FP32 dims: [4]}]", [("x", 1, 4)], ["is fixed", "'x'"]),
        # dims the model does not have
        ("max_batch_size: 8 input [{name: 'x' data_type: TYPE_FP32 dims: [4]}]", [("x", -1, 3)], ["dims [4]", "[3]"]),
        ("max_batch_size: 0 input [{name: 'x' data_type: TYPE_FP32 dims: [2, 4]}]", [("x", 2, 4, 1)], ["[2, 4, 1]"]),
        # a reshape is what the model must fit
        (
            "max_batch_size: 8 input [{name: 'x' data_type: TYPE_FP32 dims: [1] reshape: {shape: [2]}}]",
            [("x", -1)],
            ["reshape [2]", "[]"],
        ),
        # -1 in the config over a dimension the model fixes (Triton refuses it too): the metadata
        # would say any size goes, and any other than the model's failed in the engine (a 500)
        (
            "max_batch_size: 8 input [{name: 'x' data_type: TYPE_FP32 dims: [-1, 4]}]",
            [("x", -1, 3, 4)],
            ["has dims [-1, 4] but the model's are [3, 4]", "-1 fits only a dimension the model leaves free"],
        ),
        # an input the model needs, left out
        (
            "max_batch_size: 8 input [{name: 'x' data_type: TYPE_FP32 dims: [4]}]",
            [("x", -1, 4), ("mask", -1, 4)],
            ["needs input(s) 'mask'"],
        ),
        # settings Triton refuses for every platform but TensorRT (once read and not acted on:
        # a shape tensor's values would be merged into batches as rows)
        (
            "max_batch_size: 8 input [{name: 'x' data_type: TYPE_FP32 dims: [4] is_shape_tensor: true}]",
            [("x", -1, 4)],
            ["input 'x' sets is_shape_tensor", "only TensorRT"],
        ),
        # an image format on a tensor of other than 3 dims (Triton: "NHWC/NCHW require 3 dims"),
        # given or completed from the model
        (
            "max_batch_size: 8 input [{name: 'x' data_type: TYPE_FP32 format: FORMAT_NCHW dims: [4]}]",
            [("x", -1, 4)],
            ["format FORMAT_NCHW, which needs 3 dims", "not [4]"],
        ),
        (
            "max_batch_size: 8 input [{name: 'x' format: FORMAT_NHWC}]",
            [("x", -1, 4)],
            ["format FORMAT_NHWC, which needs 3 dims"],
        ),
        # dims and a reshape of other sizes (Triton: "has different size for dims and reshape"):
        # the model loaded and every request failed in the engine
        (
            "max_batch_size: 8 input [{name: 'x' data_type: TYPE_FP32 dims: [3] reshape: {shape: [4]}}]",
            [("x", -1, 4)],
            ["input 'x' has dims [3] and reshape [4], which do not hold the same number of elements"],
        ),
        (
            "max_batch_size: 8 input [{name: 'x' data_type: TYPE_FP32 dims: [2, -1] reshape: {shape: [-1, 2]}}]",
            [("x", -1, -1, 2)],
            ["dims [2, -1] and reshape [-1, 2], which do not hold the same number of elements"],
        ),
        (
            "max_batch_size: 0 input [{name: 'x' data_type: TYPE_FP32 dims: [1] reshape: {}}]",
            [("x",)],
            ["an empty reshape needs max_batch_size > 0"],
        ),
        # a negative batch size (Triton: "'max_batch_size' must be non-negative"); it was read as
        # a batch of -1 rows and the load failed saying an output's first dimension was not the batch
        ("max_batch_size: -1", [("x", -1, 4)], ["max_batch_size must not be negative", "not -1"]),
        # a tensor listed twice: the metadata listed it twice, and a client that sent what the
        # metadata says was refused for sending the input twice
        (
            "max_batch_size: 8 input [{name: 'x' data_type: TYPE_FP32 dims: [4]}, {name: 'x' dims: [4]}]",
            [("x", -1, 4)],
            ["config input 'x' is listed 2 times"],
        ),
        (
            "max_batch_size: 8 output [{name: 'x' dims: [4]}, {name: 'x'}]",
            [("x", -1, 4)],
            ["config output 'x' is listed 2 times"],
        ),
    ],
)
def test_a_config_the_model_does_not_fit_is_refused_at_load(config, model_inputs, words):
    cfg = text_format.Parse(config, mc.ModelConfig(name="m"))
    with pytest.raises(ConfigError) as e:
        complete_config(cfg, "onnxruntime_onnx", [io(n, "FP32", *shape) for n, *shape in model_inputs], [], 8)
    for w in words:
        assert w in str(e.value)


def test_a_shape_tensor_output_is_refused_at_load():
    cfg = text_format.Parse(
        "max_batch_size: 8 output [{name: 'y' data_type: TYPE_FP32 dims: [4] is_shape_tensor: true}]",
        mc.ModelConfig(name="m"),
    )
    with pytest.raises(ConfigError) as e:
        complete_config(cfg, "onnxruntime_onnx", [io("x", "FP32", -1, 4)], [io("y", "FP32", -1, 4)], 8)
    assert "output 'y' sets is_shape_tensor" in str(e.value)


def test_dims_that_fit_the_model_load():
    cfg = text_format.Parse(
        "max_batch_size: 8 input [{name: 'x' data_type: TYPE_FP32 dims: [-1, 4]}, "
        "{name: 'y' data_type: TYPE_FP32 dims: [1] reshape: {shape: []}}]",
        mc.ModelConfig(name="m"),
    )
    done = complete_config(cfg, "onnxruntime_onnx", [io("x", "FP32", -1, -1, 4), io("y", "FP32", -1)], [], 8)
    assert [list(t.dims) for t in done.input] == [[-1, 4], [1]]
    image = text_format.Parse(
        "max_batch_size: 8 input [{name: 'img' data_type: TYPE_FP32 format: FORMAT_NCHW dims: [3, 8, 8]}]",
        mc.ModelConfig(name="m"),
    )
    assert complete_config(image, "onnxruntime_onnx", [io("img", "FP32", -1, 3, 8, 8)], [], 8).input[0].format


def test_complete_config_input_not_in_model_is_an_error():
    cfg = mc.ModelConfig(name="m")
    cfg.input.add(name="pixels", data_type=mc.TYPE_FP32, dims=[2])
    with pytest.raises(ConfigError) as ei:
        complete_config(cfg, "onnxruntime_onnx", [io("image", "FP32", 2), io("mask", "BOOL", 2)], [], 8)
    msg = str(ei.value)
    assert "'pixels'" in msg and "'image'" in msg and "'mask'" in msg and "input" in msg


def test_complete_config_output_not_in_model_is_an_error():
    cfg = mc.ModelConfig(name="m")
    cfg.output.add(name="logits", data_type=mc.TYPE_FP32, dims=[2])
    with pytest.raises(ConfigError) as ei:
        complete_config(cfg, "onnxruntime_onnx", [io("x", "FP32", 2)], [io("probs", "FP32", 2)], 8)
    assert "'logits'" in str(ei.value) and "'probs'" in str(ei.value) and "output" in str(ei.value)


def test_complete_raises_instance_count_to_one_and_keeps_a_backend():
    cfg = mc.ModelConfig(name="m", backend="custom")
    cfg.instance_group.add(count=0, kind=mc.ModelInstanceGroup.KIND_CPU)
    done = complete_config(cfg, "onnxruntime_onnx", [io("x", "FP32", 2)], [io("y", "FP32", 2)], 8)
    assert done.instance_group[0].count == 1
    assert done.backend == "custom" and done.platform == ""


def test_completed_config_gives_a_signature():
    done = complete_config(
        mc.ModelConfig(name="m"),
        "onnxruntime_onnx",
        [io("x", "FP32", -1, 3)],
        [io("y", "INT64", -1)],
        default_max_batch_size=8,
    )
    s = signature_of(done)
    assert s.name == "m" and s.max_batch_size == 8 and s.platform == "onnxruntime_onnx"
    assert [(t.name, t.dtype.v2, t.dims) for t in s.inputs] == [("x", "FP32", (3,))]
    assert [(t.name, t.dtype.v2, t.dims) for t in s.outputs] == [("y", "INT64", ())]


# ---------------------------------------------------------------- config_to_json
def test_config_to_json_uses_field_names_and_numbers(tmp_path):
    d = config_to_json(read_config(model_dir(tmp_path, "resnet", PBTXT), "resnet"))
    assert d["name"] == "resnet" and d["max_batch_size"] == 16
    assert d["input"][0]["dims"] == [3, 224, 224]
    assert d["input"][0]["data_type"] == "TYPE_FP32"
    assert d["output"][0]["dims"] == [1000]
    assert d["dynamic_batching"]["max_queue_delay_microseconds"] == 500
    assert d["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert d["version_policy"] == {"latest": {"num_versions": 2}}
    # fields left at their default are printed too, as Triton does
    assert d["input"][0]["optional"] is False and d["input"][0]["format"] == "FORMAT_NONE"
    assert d["backend"] == ""


INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def int64_paths(desc, prefix=()):
    """Every 64-bit integer field reachable from ModelConfig, as a path of (field, how) steps."""
    for f in desc.fields:
        repeated = f.label == FieldDescriptor.LABEL_REPEATED
        if f.message_type is not None:
            if f.message_type.GetOptions().map_entry:
                value = f.message_type.fields_by_name["value"]
                key_is_int = f.message_type.fields_by_name["key"].type != FieldDescriptor.TYPE_STRING
                if value.message_type is not None:
                    yield from int64_paths(value.message_type, prefix + ((f.name, "imap" if key_is_int else "map"),))
                continue
            yield from int64_paths(f.message_type, prefix + ((f.name, "add" if repeated else "msg"),))
        elif f.type in INT64:
            yield prefix + ((f.name, "append" if repeated else "set"),)


BIG = 5_000_000_123  # needs 64 bits


def set_path(msg, path):
    for name, how in path[:-1]:
        field = getattr(msg, name)
        msg = field["k"] if how == "map" else field[1] if how == "imap" else field.add() if how == "add" else field
    name, how = path[-1]
    if how == "append":
        getattr(msg, name).append(BIG)
    else:
        setattr(msg, name, BIG)


def get_path(d, path):
    for name, how in path[:-1]:
        d = d[name]["k"] if how == "map" else d[name]["1"] if how == "imap" else d[name][0] if how == "add" else d[name]
    name, how = path[-1]
    return d[name][0] if how == "append" else d[name]


NOT_CONVERTED = {  # 64-bit fields deep in the schema that a key-name approach would miss
    "ensemble_scheduling.step.model_version",
    "instance_group.secondary_devices.device_id",
    "optimization.cuda.graph_spec.input.dim",
    "optimization.cuda.graph_spec.graph_lower_bound.input.dim",
}
PATHS = list(int64_paths(mc.ModelConfig.DESCRIPTOR))


def _param(path):
    return pytest.param(path, id=".".join(name for name, _ in path))


def test_the_walk_finds_the_known_int64_fields():
    ids = {".".join(n for n, _ in p) for p in PATHS}
    assert {
        "input.dims",
        "output.dims",
        "dynamic_batching.max_queue_delay_microseconds",
        "version_policy.specific.versions",
        "sequence_batching.max_sequence_idle_microseconds",
    } <= ids
    assert ids >= NOT_CONVERTED


@pytest.mark.parametrize("path", [_param(p) for p in PATHS])
def test_config_to_json_prints_every_int64_field_as_a_number(path):
    cfg = mc.ModelConfig(name="m")
    set_path(cfg, path)
    value = get_path(config_to_json(cfg), path)
    assert value == BIG and isinstance(value, int)


@pytest.mark.parametrize("where", ["metric_tags", "ensemble_input_map"])
def test_config_to_json_leaves_string_maps_alone(where):
    cfg = mc.ModelConfig(name="m")
    if where == "metric_tags":
        cfg.metric_tags["count"] = "42"
        assert config_to_json(cfg)["metric_tags"] == {"count": "42"}
    else:
        step = cfg.ensemble_scheduling.step.add(model_name="pre", model_version=-1)
        step.input_map["shape"] = "SHAPE_IN"
        assert config_to_json(cfg)["ensemble_scheduling"]["step"][0]["input_map"] == {"shape": "SHAPE_IN"}
