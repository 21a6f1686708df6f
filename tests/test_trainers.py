"""The output of `pack` loads in the trainers our users run, with no file moved and no column renamed.

EasyR1 (`data.train_files=OUT/data prompt_key=problem answer_key=answer image_key=images`) and LLaMA-Factory (a
`dataset_info.json` entry, sharegpt) are reproduced call for call in `_trainers.py` (file and commit cited there),
on real annotations: LLaVA-Instruct conversations (sample_data/conversations.jsonl) and LLaMA-Factory's own demo
files (tests/data/trainer). `datasets.load_dataset` on OUT and on OUT/data decodes the images to PIL.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _trainers import (
    easyr1_collate,
    easyr1_example,
    easyr1_load,
    listing_types,
    llamafactory_load,
    llamafactory_regularize_images,
    llamafactory_sharegpt,
    llamafactory_validate_messages,
)
from PIL import Image, ImageOps
from typer.testing import CliRunner

from mmprep.cli import app

runner = CliRunner()
HERE = Path(__file__).parent
SAMPLE = HERE.parent / "sample_data"
TRAINER_DATA = HERE / "data" / "trainer"
CONVERSATIONS = SAMPLE / "conversations.jsonl"


def run_pack(*args: str) -> dict:
    res = runner.invoke(app, ["pack", *args, "--workers", "1", "--json"])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def source_rows() -> dict[str, dict]:
    return {json.loads(line)["id"]: json.loads(line) for line in CONVERSATIONS.read_text().splitlines()}


@pytest.fixture(scope="module")
def easyr1_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("easyr1") / "out"
    report = run_pack(str(CONVERSATIONS), "--out", str(out), "--target", "easyr1")
    assert report["written"] == 7 and report["rejected_by_reason"] == {"bad_column": 1}
    assert report["columns"][:2] == ["problem", "answer"]
    return out


@pytest.fixture(scope="module")
def llamafactory_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaMA-Factory's mllm_demo.json with its three images stood in for by sample_data photographs."""
    root = tmp_path_factory.mktemp("mllm")
    (root / "mllm_demo_data").mkdir()
    for k, name in enumerate(["astronaut.jpg", "rocket.jpg", "chelsea.jpg"], 1):
        shutil.copy(SAMPLE / "images" / name, root / "mllm_demo_data" / f"{k}.jpg")
    shutil.copy(TRAINER_DATA / "mllm_demo.json", root / "mllm_demo.json")
    return root


# -- EasyR1 --------------------------------------------------------------------------------------------------------


def test_easyr1_loads_out_data_as_it_is(easyr1_out: Path, tmp_path: Path) -> None:
    data = easyr1_out / "data"
    assert listing_types(data) == {".parquet"}  # whatever os.listdir puts first, EasyR1 picks "parquet"
    source = source_rows()
    for path in (str(data), f"{data}@train"):
        ds = easyr1_load(path, cache_dir=str(tmp_path / path[-5:]))
        assert len(ds) == 7
        assert {"images", "problem", "answer"} <= set(ds.column_names)
        batch = easyr1_collate([easyr1_example(ds, i)["example"] for i in range(len(ds))])
        assert len(batch["ground_truth"]) == 7 and len(batch["conversations"]) == 7  # every column batches
        for i in range(len(ds)):
            sid = ds[i]["id"]
            got = easyr1_example(ds, i)  # one <image> content part per image, ground truth present
            want = source[sid]["conversations"]
            assert got["ground_truth"] == want[-1]["value"]  # the last assistant turn
            prompt = "".join(p.get("text", "<image>") for p in got["messages"][0]["content"])
            assert prompt == want[0]["value"]  # the first user turn, with its placeholder
            assert want[-1]["value"] not in prompt  # the prompt does not hold its own answer
            ref = ImageOps.exif_transpose(Image.open(SAMPLE / source[sid]["image"])).convert("RGB")
            assert got["images"][0].size == ref.size
            assert np.array_equal(np.asarray(got["images"][0]), np.asarray(ref))


def test_easyr1_reads_a_problem_answer_manifest_and_rejects_what_it_could_not_pair(
        llamafactory_demo: Path, tmp_path: Path) -> None:
    """mllm_demo rows 1 and 4 have two images but one <image> in the first user turn: EasyR1 would give the model
    one image for two; those rows are rejected with the reason, the others load."""
    out = tmp_path / "out"
    report = run_pack(str(llamafactory_demo / "mllm_demo.json"), "--out", str(out), "--target", "easyr1")
    assert report["written"] == 4 and report["rejected_by_reason"] == {"placeholder_mismatch": 2}
    text = (llamafactory_demo / "mllm_demo.json").read_text()
    starts = [n for n, line in enumerate(text.splitlines(), 1) if line.startswith("  {")]  # where records start
    demo = dict(zip(starts, json.loads(text), strict=True))
    rej = [json.loads(line) for line in (out / "rejected-train.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rej] == [starts[0], starts[3]] and "first user turn" in rej[0]["detail"]
    ds = easyr1_load(str(out / "data"), cache_dir=str(tmp_path / "c"))
    for i in range(len(ds)):
        got = easyr1_example(ds, i)
        assert got["ground_truth"] == demo[ds[i]["line"]]["messages"][-1]["content"]


def test_easyr1_without_an_answer_is_a_reject_not_a_key_error(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes((SAMPLE / "images" / "rocket.jpg").read_bytes())
    rows = [{"id": "q", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}]},
            {"id": "qa", "image": "a.jpg", "conversations": [{"from": "human", "value": "Which vehicle?"},
                                                             {"from": "gpt", "value": "A rocket."}]}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = run_pack(str(manifest), "--out", str(tmp_path / "o"), "--target", "easyr1")
    assert report["rejected_by_reason"] == {"answer_missing": 1} and report["written"] == 1
    row = pq.read_table(tmp_path / "o" / "data").to_pylist()[0]
    assert row["problem"] == "<image>Which vehicle?" and row["answer"] == "A rocket."  # placeholder put in front


# -- LLaMA-Factory ---------------------------------------------------------------------------------------------------


MLLM_DEMO_ENTRY = {"formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
                   "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                            "assistant_tag": "assistant"}}


def check_llamafactory(ds, attr: dict) -> int:
    """Every row converts without being dropped, its images regularise and match its <image> tokens."""
    for example in ds:
        aligned = llamafactory_sharegpt(example, attr)
        assert aligned["_prompt"] and aligned["_response"], "LLaMA-Factory would drop this row as broken"
        images = llamafactory_regularize_images(aligned["_images"])
        llamafactory_validate_messages(aligned["_prompt"] + aligned["_response"], images)
        assert all(im.width > 1 and im.height > 1 for im in images)
    return len(ds)


def test_llamafactory_loads_out_data_from_dataset_info(llamafactory_demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = run_pack(str(llamafactory_demo / "mllm_demo.json"), "--out", str(out), "--target", "llamafactory")
    assert report["written"] == 6 and report["rejected"] == 0  # two-image rows too: one <image> per image
    assert listing_types(out / "data") == {".parquet"}
    dataset_info = {"mmprep_demo": {"file_name": "out/data", **MLLM_DEMO_ENTRY}}  # as in the README
    (tmp_path / "dataset_info.json").write_text(json.dumps(dataset_info))
    attr = json.loads((tmp_path / "dataset_info.json").read_text())["mmprep_demo"]
    ds = llamafactory_load(str(tmp_path), attr, cache_dir=str(tmp_path / "c"))
    assert {"messages", "images"} <= set(ds.column_names)
    assert check_llamafactory(ds, attr) == 6
    demo = json.loads((llamafactory_demo / "mllm_demo.json").read_text())
    assert [m["content"] for m in ds[0]["messages"]] == [m["content"] for m in demo[0]["messages"]]
    assert len(ds[0]["images"]) == 2
    with pytest.raises(ValueError, match="Allowed file types"):  # why the shards must sit alone in data/
        llamafactory_load(str(tmp_path), {**attr, "file_name": "out"}, cache_dir=str(tmp_path / "d"))


def test_llamafactory_from_llava_conversations_and_typed_parts(tmp_path: Path) -> None:
    """LLaVA `conversations` (human/gpt) and LLaMA-Factory v1 typed content parts become ShareGPT messages."""
    out = tmp_path / "llava"
    report = run_pack(str(CONVERSATIONS), "--out", str(out), "--target", "llamafactory", "--drop-columns",
                      "difficulty")
    assert report["written"] == 8
    attr = {"file_name": "llava/data", **MLLM_DEMO_ENTRY}
    ds = llamafactory_load(str(tmp_path), attr, cache_dir=str(tmp_path / "c1"))
    assert check_llamafactory(ds, attr) == 8
    first = ds[0]
    assert first["messages"][0]["role"] == "user" and first["conversations"][0]["from"] == "human"  # both kept
    root = tmp_path / "v1"
    (root / "data" / "mllm_demo_data").mkdir(parents=True)
    for k, name in enumerate(["coffee.jpg", "coins.png", "horse.png", "camera.png"], 1):
        shutil.copy(SAMPLE / "images" / name, root / "data" / "mllm_demo_data" / f"{k}.jpg")
    shutil.copy(TRAINER_DATA / "v1_multimodal_demo.jsonl", root / "v1.jsonl")
    report = run_pack(str(root / "v1.jsonl"), "--out", str(tmp_path / "typed"), "--target", "llamafactory")
    assert report["written"] == 24 and report["rejected"] == 0, report["rejected_by_reason"]
    ds = llamafactory_load(str(tmp_path), {"file_name": "typed/data", **MLLM_DEMO_ENTRY},
                           cache_dir=str(tmp_path / "c2"))
    assert check_llamafactory(ds, {"file_name": "typed/data", **MLLM_DEMO_ENTRY}) == report["written"]


def test_llamafactory_reads_one_split_of_many_through_the_card(llamafactory_demo: Path, tmp_path: Path) -> None:
    """Several splits in one folder: a `script_url` entry reads the folder through its card, one split each."""
    out = tmp_path / "out"
    run_pack(str(llamafactory_demo / "mllm_demo.json"), "--out", str(out), "--target", "llamafactory")
    run_pack(str(llamafactory_demo / "mllm_demo.json"), "--out", str(out), "--target", "llamafactory",
             "--split", "validation", "--rows-per-shard", "2")
    for split, n in (("train", 6), ("validation", 6)):
        attr = {"script_url": "out", "split": split, **MLLM_DEMO_ENTRY}
        ds = llamafactory_load(str(tmp_path), attr, cache_dir=str(tmp_path / split))
        assert check_llamafactory(ds, attr) == n


# -- Hugging Face datasets -------------------------------------------------------------------------------------------


def test_datasets_decodes_the_images_to_pil(easyr1_out: Path, tmp_path: Path) -> None:
    import datasets

    for ds in (datasets.load_dataset(str(easyr1_out), split="train", cache_dir=str(tmp_path / "a")),
               datasets.load_dataset("parquet", data_dir=str(easyr1_out / "data"), split="train",
                                     cache_dir=str(tmp_path / "b"))):
        assert isinstance(ds.features["images"], datasets.List | datasets.Sequence)
        first = ds[0]
        assert isinstance(first["images"][0], Image.Image) and first["images"][0].size == (512, 512)
        assert first["conversations"][0]["from"] == "human"  # a list of turns, not a dict of lists
        assert first["meta"]["license"] == "CC BY 4.0"


def test_hf_target_keeps_a_datasets_parquet_with_its_features(tmp_path: Path) -> None:
    """LLaMA-Factory's example Parquet (written by `datasets`: typed content parts, path-only Image values) packed
    with the default target: `messages` is carried with its type and its `datasets` feature."""
    import datasets

    (tmp_path / "data" / "images").mkdir(parents=True)
    for k, name in enumerate(["astronaut.jpg", "rocket.jpg", "chelsea.jpg"], 1):
        shutil.copy(SAMPLE / "images" / name, tmp_path / "data" / "images" / f"{k}.jpg")
    src = tmp_path / "test-0.parquet"
    shutil.copy(TRAINER_DATA / "llamafactory_mllm_example_dataset_test-0.parquet", src)
    out = tmp_path / "out"
    report = run_pack(str(src), "--out", str(out), "--pad", "none")
    assert report["written"] == 3 and report["columns"] == ["messages"]
    original = pq.read_table(src)
    packed = pq.read_table(out / "data")
    assert packed.schema.field("messages").type == original.schema.field("messages").type
    assert packed.column("messages").to_pylist() == original.column("messages").to_pylist()
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "c"))
    want = datasets.load_dataset("parquet", data_files=str(src), split="train", cache_dir=str(tmp_path / "d"))
    assert ds.features["messages"] == want.features["messages"]
    assert ds[0]["messages"] == want.select_columns(["messages"])[0]["messages"]  # (its images are not here)
    assert isinstance(ds[0]["images"][0], Image.Image)
    run_pack(str(src), "--out", str(tmp_path / "lf"), "--target", "llamafactory")
    row = pq.read_table(tmp_path / "lf" / "data").to_pylist()[0]
    assert row["messages"][0] == {"role": "user", "content": "Who are they?<image>"}  # parts joined in order
