"""Issue 33: what an auto-prepared dataset is keyed on changes with everything its preparation reads, so a changed
source is prepared anew instead of reusing old labels, audio or token ids. One process, no preparing: the key is
what data.prepared=auto looks its dataset up by."""

import json
import os
from types import SimpleNamespace

from ddl_apps.trainers.asr.prepared import source_identity as speech_identity
from ddl_apps.trainers.image.prepared import source_identity as image_identity
from ddl_apps.trainers.nlp.data import preparation_depends_on as text_depends_on


def recipe(data_source: str = "", model_source: str = "") -> SimpleNamespace:
    return SimpleNamespace(data=SimpleNamespace(source=data_source), model=SimpleNamespace(source=model_source))


def test_an_image_folder_changes_its_key_when_files_move_between_classes_or_a_class_is_renamed(tmp_path):
    for label, names in {"cat": ["a.png", "b.png"], "dog": ["c.png"]}.items():
        (tmp_path / label).mkdir()
        for name in names:
            (tmp_path / label / name).write_bytes(b"\x89PNG same size")
    keys = [image_identity(recipe(str(tmp_path)))]
    os.rename(tmp_path / "cat" / "b.png", tmp_path / "dog" / "b.png")  # same count, sizes and times
    keys.append(image_identity(recipe(str(tmp_path))))
    os.rename(tmp_path / "dog", tmp_path / "puppy")
    keys.append(image_identity(recipe(str(tmp_path))))
    assert len({json.dumps(k) for k in keys}) == 3
    assert image_identity(recipe(str(tmp_path))) == keys[-1]  # and nothing else changes it


def test_a_speech_folder_changes_its_key_when_audio_is_recorded_again(tmp_path):
    (tmp_path / "audio").mkdir()
    for split in ("train", "valid", "test"):
        (tmp_path / "audio" / f"{split}.wav").write_bytes(b"RIFF old take")
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"audio_filepath": f"audio/{split}.wav", "text": "go"}))
    before = speech_identity(recipe(str(tmp_path)))
    (tmp_path / "audio" / "valid.wav").write_bytes(b"RIFF new take")  # manifests untouched
    os.utime(tmp_path / "audio" / "valid.wav", ns=(1, 1))
    assert speech_identity(recipe(str(tmp_path))) != before


def test_a_text_model_folder_changes_its_key_when_another_tokenizer_is_saved_into_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text('{"vocab": ["a", "b"]}')
    before = text_depends_on(recipe(model_source=str(tmp_path)))
    stat = (tmp_path / "tokenizer.json").stat()
    (tmp_path / "tokenizer.json").write_text('{"vocab": ["b", "a"]}')  # same size, its time kept (a copy -p)
    os.utime(tmp_path / "tokenizer.json", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert text_depends_on(recipe(model_source=str(tmp_path))) != before
