"""What the trainers our users run do when they load a dataset, reproduced step by step (in our own words).

Neither trainer can be installed here (they pull GPU stacks), so the tests run the same calls they make, in the same
order, with the same libraries (``os.listdir``, ``datasets.load_dataset``, PIL) and the same checks:

- EasyR1, ``verl/utils/dataset.py`` at commit b44b311 (github.com/hiyouga/EasyR1): ``RLHFDataset.__init__`` (the
  ``path@split`` suffix; a folder's file type taken from the extension of the **first** ``os.listdir`` entry, then
  ``load_dataset(type, data_dir=path, split=split)``), ``_build_messages`` (the prompt cut at every ``<image>`` into
  text and image content parts), ``process_image`` (a path, ``{bytes, path}`` dict, bytes or PIL image opened and
  converted to RGB) and ``__getitem__`` (``example.pop(image_key)``, ``example.pop(answer_key)`` as the ground truth).
- LLaMA-Factory, commit ff6d4d1 (github.com/hiyouga/LLaMA-Factory): ``src/llamafactory/data/parser.py``
  (``dataset_info.json`` entries: ``file_name`` loads a local file or folder, ``script_url`` a dataset folder
  through ``load_dataset``), ``loader.py`` ``_load_single_dataset`` (a folder: every file listed, all of one
  allowed type, else ``ValueError``), ``converter.py`` ``SharegptDatasetConverter`` (an optional system turn, then
  user/assistant turns alternating, an even number, else the row is dropped as broken), and ``mm_plugin.py``
  ``_regularize_images`` / ``_validate_messages`` (images as paths, bytes, dicts or PIL images; one ``<image>`` per
  image across the messages).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from PIL import Image

# LLaMA-Factory src/llamafactory/extras/constants.py FILEEXT2TYPE
FILEEXT2TYPE = {"arrow": "arrow", "csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet", "txt": "text"}
IMAGE_PLACEHOLDER = "<image>"


# -- EasyR1 --------------------------------------------------------------------------------------------------------


def easyr1_process_image(image: Any) -> Image.Image:
    """EasyR1 ``process_image`` without the min/max pixel resizing."""
    if isinstance(image, str):
        image = Image.open(image)
    elif isinstance(image, dict):
        image = Image.open(io.BytesIO(image["bytes"]))
    elif isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    image.load()
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def easyr1_load(data_path: str, cache_dir: str) -> Any:
    """``RLHFDataset.__init__``: the dataset EasyR1 gets for ``data.train_files=<data_path>``."""
    from datasets import load_dataset

    if "@" in data_path:
        data_path, data_split = data_path.split("@")
    else:
        data_split = "train"
    if os.path.isdir(data_path):
        file_type = os.path.splitext(os.listdir(data_path)[0])[-1][1:].replace("jsonl", "json")
        return load_dataset(file_type, data_dir=data_path, split=data_split, cache_dir=cache_dir)
    file_type = os.path.splitext(data_path)[-1][1:].replace("jsonl", "json")
    return load_dataset(file_type, data_files=data_path, split=data_split, cache_dir=cache_dir)


def easyr1_example(dataset: Any, index: int, prompt_key: str = "problem", answer_key: str = "answer",
                   image_key: str = "images") -> dict[str, Any]:
    """``_build_messages`` and the image/answer part of ``__getitem__`` for one row: returns the messages, the
    processed images and the ground truth, after checking what the model's processor would (one image per image
    content part)."""
    example: dict[str, Any] = dataset[index]
    prompt_str: str = example[prompt_key]
    assert image_key in example, f"no '{image_key}' column: EasyR1 would build a text-only prompt"
    content_list: list[dict[str, Any]] = []
    for i, content in enumerate(prompt_str.split("<image>")):
        if i != 0:
            content_list.append({"type": "image"})
        if content:
            content_list.append({"type": "text", "text": content})
    messages = [{"role": "user", "content": content_list}]
    example.pop(prompt_key, None)
    images = example.pop(image_key)
    processed = [easyr1_process_image(image) for image in images]
    n_parts = sum(1 for part in content_list if part["type"] == "image")
    assert n_parts == len(processed), f"{n_parts} <image> in the prompt, {len(processed)} images"
    ground_truth = example.pop(answer_key)  # KeyError without the answer column, as in EasyR1
    example["ground_truth"] = ground_truth
    return {"messages": messages, "images": processed, "ground_truth": ground_truth, "example": example}


def easyr1_collate(features: list[dict[str, Any]]) -> dict[str, Any]:
    """``collate_fn`` for the non-tensor values (the columns a dataset brings besides the processor's tensors)."""
    import numpy as np

    non_tensors: dict[str, list[Any]] = {}
    for feature in features:
        for key, value in feature.items():
            non_tensors.setdefault(key, []).append(value)
    return {key: np.array(value, dtype=object) for key, value in non_tensors.items()}


# -- LLaMA-Factory -------------------------------------------------------------------------------------------------


def llamafactory_load(dataset_dir: str, attr: dict[str, Any], cache_dir: str) -> Any:
    """``_load_single_dataset`` for a ``dataset_info.json`` entry (``file_name`` or ``script_url``)."""
    from datasets import load_dataset

    split = attr.get("split", "train")
    if "script_url" in attr:  # load_from == "script"
        data_path = os.path.join(dataset_dir, attr["script_url"])
        return load_dataset(path=data_path, name=attr.get("subset"), data_dir=attr.get("folder"), data_files=None,
                            split=split, cache_dir=cache_dir)
    data_files = []
    local_path = os.path.join(dataset_dir, attr["file_name"])
    if os.path.isdir(local_path):
        for file_name in os.listdir(local_path):
            data_files.append(os.path.join(local_path, file_name))
    elif os.path.isfile(local_path):
        data_files.append(local_path)
    else:
        raise ValueError(f"File {local_path} not found.")
    data_path = FILEEXT2TYPE.get(os.path.splitext(data_files[0])[-1][1:])
    if data_path is None:
        raise ValueError("Allowed file types: {}.".format(",".join(FILEEXT2TYPE.keys())))
    if any(data_path != FILEEXT2TYPE.get(os.path.splitext(f)[-1][1:]) for f in data_files):
        raise ValueError("File types should be identical.")
    return load_dataset(path=data_path, name=None, data_dir=None, data_files=data_files, split=split,
                        cache_dir=cache_dir)


def llamafactory_sharegpt(example: dict[str, Any], attr: dict[str, Any]) -> dict[str, Any]:
    """``SharegptDatasetConverter.__call__`` (no ranking, no kto, no tools): the aligned prompt/response, or empty
    lists for a conversation it drops as broken."""
    columns = attr.get("columns", {})
    tags = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
            "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system",
            **attr.get("tags", {})}
    tag_mapping = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["observation_tag"]: "observation",
                   tags["function_tag"]: "function", tags["system_tag"]: "system"}
    odd_tags = (tags["user_tag"], tags["observation_tag"])
    even_tags = (tags["assistant_tag"], tags["function_tag"])
    accept_tags = (odd_tags, even_tags)
    messages = example[columns.get("messages", "conversations")]
    if tags["system_tag"] and len(messages) != 0 and messages[0][tags["role_tag"]] == tags["system_tag"]:
        system = messages[0][tags["content_tag"]]
        messages = messages[1:]
    else:
        system = ""
    aligned, broken = [], False
    for turn_idx, message in enumerate(messages):
        if message[tags["role_tag"]] not in accept_tags[turn_idx % 2]:
            broken = True
            break
        aligned.append({"role": tag_mapping[message[tags["role_tag"]]], "content": message[tags["content_tag"]]})
    if len(aligned) % 2 != 0:
        broken = True
    prompt, response = ([], []) if broken else (aligned[:-1], aligned[-1:])
    images = example[columns["images"]] if "images" in columns else None
    if images is not None and not isinstance(images, list):
        images = [images]
    return {"_prompt": prompt, "_response": response, "_system": system, "_images": images or None}


def llamafactory_regularize_images(images: list[Any]) -> list[Image.Image]:
    """``MMPluginMixin._regularize_images`` without the resizing."""
    results = []
    for image in images:
        if isinstance(image, str):
            image = Image.open(image)
        elif isinstance(image, bytes):
            image = Image.open(io.BytesIO(image))
        elif isinstance(image, dict):
            image = Image.open(io.BytesIO(image["bytes"])) if image["bytes"] is not None else Image.open(image["path"])
        if not isinstance(image, Image.Image):
            raise ValueError(f"Expect input is a list of images, but got {type(image)}.")
        results.append(image.convert("RGB"))
    return results


def llamafactory_validate_messages(messages: list[dict[str, str]], images: list[Any]) -> None:
    """``MMPluginMixin._validate_messages`` for images."""
    num_image_tokens = sum(message["content"].count(IMAGE_PLACEHOLDER) for message in messages)
    if len(images) != num_image_tokens:
        raise ValueError(f"The number of images does not match the number of {IMAGE_PLACEHOLDER} tokens in "
                         f"{messages}.")


def listing_types(folder: Path) -> set[str]:
    """The extensions of every entry of a folder (what both trainers look at)."""
    return {os.path.splitext(name)[-1] for name in os.listdir(folder)}
