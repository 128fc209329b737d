"""The vocabulary (class names + prompt templates) and its validation.

A vocabulary is immutable: a change makes a new object with a higher version, so an output made with one version
can never be mixed with another (the node swaps one reference atomically).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from .templates import DEFAULT_TEMPLATES, TEMPLATE_SETS, expand_template_sets

UNLABELLED = 65535
SYNONYM_SEPARATOR = ";"
MAX_VERSION = 2**32 - 1  # vocabulary_version is a uint32 in every message; 0 means "a per-request vocabulary"


def next_version(version: int) -> int:
    """The version after `version`: wraps from 2^32 - 1 to 1, never to 0 (which means per-request)."""
    return version + 1 if version < MAX_VERSION else 1


class VocabularyError(ValueError):
    """A vocabulary request that cannot be accepted; the message says why."""


@dataclass(frozen=True)
class VocabularyLimits:
    """Bounds that keep one request from exhausting memory or time."""

    max_classes: int = 1000
    max_name_length: int = 128
    max_templates: int = 100  # room for CLIP's 80 ImageNet templates (`imagenet80`)


MAX_EXEMPLARS = 64  # example images per vocabulary


@dataclass(frozen=True)
class Exemplar:
    """An example image of a class, as the CLIP embedding it pools to (meaningful only for `model_id`)."""

    label: str  # the class (one of the vocabulary's labels)
    embedding: tuple[float, ...]  # the pooled CLIP embedding, scaled to compete fairly with text queries
    model_id: str


@dataclass(frozen=True)
class Vocabulary:
    """Class names (each may hold ';'-separated synonyms), the prompt templates that embed them, and example
    images of some classes (their embeddings join the text embeddings)."""

    labels: tuple[str, ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    version: int = 1
    exemplars: tuple[Exemplar, ...] = ()
    synonyms: tuple[tuple[str, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "synonyms", tuple(split_synonyms(label) for label in self.labels))

    @property
    def display_names(self) -> list[str]:
        """The first synonym of each class: what outputs call it."""
        return [names[0] for names in self.synonyms]

    def __len__(self) -> int:
        return len(self.labels)


def classes_named(vocabulary: Vocabulary, names: str | tuple[str, ...] | list[str]) -> frozenset[int]:
    """Indices of the classes any of whose synonyms is one of `names` (case-insensitive); `names` may be one
    comma-separated string (how a ROS string parameter gives a list)."""
    wanted = {n.strip().lower() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()}
    return frozenset(i for i, synonyms in enumerate(vocabulary.synonyms) if wanted & {n.lower() for n in synonyms})


def split_synonyms(label: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in label.split(SYNONYM_SEPARATOR) if part.strip())


LABEL_SET_PREFIX = "@"  # a label "@coco" stands for a released class list (LABEL_SETS)
LABEL_SETS = ("coco", "lvis")  # OV-SAM's COCO names with synonyms (80) and LVIS v1's (1203)
LABEL_SET_DIR = Path(__file__).resolve().parents[1] / "model_configs" / "ovsam"


@cache
def label_set(name: str) -> dict:
    """A released class list (``coco``: OV-SAM's COCO names with synonyms; ``lvis``: LVIS v1's 1203), as our
    labels ('a;b' synonyms) with its base (training) and novel ids."""
    path = LABEL_SET_DIR / f"classes-{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown label set '{name}'")
    return json.loads(path.read_text())


def expand_label_sets(labels: list | tuple) -> list:
    """Replace every "@NAME" entry by the released class list NAME (model_configs/ovsam/classes-NAME.json)."""
    out = []
    for label in labels:
        if not (isinstance(label, str) and label.strip().startswith(LABEL_SET_PREFIX)):
            out.append(label)
            continue
        name = label.strip()[len(LABEL_SET_PREFIX):]
        if name not in LABEL_SETS:
            raise VocabularyError(f"unknown class list '{label.strip()}'; known: "
                                  + ", ".join(LABEL_SET_PREFIX + n for n in LABEL_SETS))
        out.extend(label_set(name)["labels"])
    return out


def validate_labels(labels: object, limits: VocabularyLimits = VocabularyLimits()) -> tuple[str, ...]:
    """Return clean labels or raise VocabularyError saying exactly what is wrong. "@coco" and "@lvis" expand to
    the released class lists."""
    if isinstance(labels, str) or not isinstance(labels, (list, tuple)):
        raise VocabularyError(f"labels must be a list of strings, got {type(labels).__name__}")
    labels = expand_label_sets(labels)
    if len(labels) == 0:
        raise VocabularyError("the vocabulary is empty: give at least one class name")
    if len(labels) > 1 and all(isinstance(lbl, str) and len(lbl) == 1 for lbl in labels):
        # What arrives when a client sends a string where a list belongs (`{labels: 'cat,dog'}` in YAML):
        # the string is taken as a sequence and split into characters.
        raise VocabularyError(
            f"every label is a single character ({''.join(labels)[:40]!r}): labels must be a list of class names, "
            "not one string split into characters; send e.g. labels: ['cat', 'dog']"
        )
    if len(labels) > limits.max_classes:
        raise VocabularyError(f"{len(labels)} classes exceed the limit of {limits.max_classes} (max_classes)")
    clean: list[str] = []
    seen: dict[str, int] = {}
    for index, label in enumerate(labels):
        if not isinstance(label, str):
            raise VocabularyError(f"label {index} is {type(label).__name__}, not a string")
        label = label.strip()
        names = split_synonyms(label)
        if not names:
            raise VocabularyError(f"label {index} is empty")
        if len(label) > limits.max_name_length:
            raise VocabularyError(
                f"label {index} is {len(label)} characters long; the limit is {limits.max_name_length}"
                " (max_name_length)"
            )
        if any(ord(ch) < 32 for ch in label):
            raise VocabularyError(f"label {index} contains control characters")
        key = names[0].lower()
        if key in seen:
            raise VocabularyError(f"label {index} '{names[0]}' repeats label {seen[key]}")
        seen[key] = index
        clean.append(SYNONYM_SEPARATOR.join(names))
    return tuple(clean)


def template_problem(template: object) -> str | None:
    """Why a prompt template cannot embed a class name, or None. Valid: exactly one plain '{}' and no other
    replacement field ('{{}}' is literal braces, so it holds no placeholder)."""
    if not isinstance(template, str):
        return f"is {type(template).__name__}, not a string"
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        return f"is not a valid format string ({exc})"
    if len(fields) != 1 or fields[0] != ("", "", None):
        return "must hold exactly one '{}' placeholder and no other replacement field"
    return None


def validate_templates(templates: object, limits: VocabularyLimits = VocabularyLimits()) -> tuple[str, ...]:
    """Clean templates; an entry naming a template set (e.g. 'imagenet80') stands for that set's templates."""
    if isinstance(templates, str) or not isinstance(templates, (list, tuple)):
        raise VocabularyError(f"prompt_templates must be a list of strings, got {type(templates).__name__}")
    templates = expand_template_sets(templates)
    if len(templates) > limits.max_templates:
        raise VocabularyError(f"{len(templates)} templates exceed the limit of {limits.max_templates}")
    clean = []
    for index, template in enumerate(templates):
        problem = template_problem(template)
        if problem is not None:
            raise VocabularyError(f"prompt template {index} {problem}: {template!r} (or name a template set: "
                                  f"{', '.join(TEMPLATE_SETS)})")
        if len(template) > 4 * limits.max_name_length:
            raise VocabularyError(f"prompt template {index} is too long")
        clean.append(template)
    return tuple(clean)


def make_vocabulary(
    labels: object,
    templates: object | None = None,
    previous: Vocabulary | None = None,
    limits: VocabularyLimits = VocabularyLimits(),
) -> Vocabulary:
    """Validate a request and build the next vocabulary; empty/None templates keep the previous ones."""
    clean_labels = validate_labels(labels, limits)
    if templates is None or (isinstance(templates, (list, tuple)) and len(templates) == 0):
        clean_templates = previous.templates if previous is not None else DEFAULT_TEMPLATES
    else:
        clean_templates = validate_templates(templates, limits)
    version = next_version(previous.version) if previous is not None else 1
    return Vocabulary(labels=clean_labels, templates=clean_templates, version=version)


def with_exemplars(vocabulary: Vocabulary, exemplars: list[Exemplar], keep: tuple[Exemplar, ...] = (),
                   limits: VocabularyLimits = VocabularyLimits()) -> Vocabulary:
    """`vocabulary` with `keep` (earlier examples, kept when their class remains) and new `exemplars` (a label
    that is not a class yet becomes one). Both are named by one rule: "Sofa" or "couch" is the class
    "sofa;couch", so an example survives its class gaining a synonym or changing case."""
    labels = list(vocabulary.labels)

    def class_of(label: str) -> str | None:
        names = {name.lower() for name in split_synonyms(label)}
        return next((known for known in labels if names & {n.lower() for n in split_synonyms(known)}), None)

    kept = [Exemplar(match, e.embedding, e.model_id) for e in keep if (match := class_of(e.label)) is not None]
    named = []
    for index, exemplar in enumerate(exemplars):
        try:
            clean = validate_labels([exemplar.label], limits)[0]
        except VocabularyError as exc:
            raise VocabularyError(f"exemplar_labels[{index}]: {exc}") from None
        match = class_of(clean)
        if match is None:
            labels.append(match := clean)
        named.append(Exemplar(match, exemplar.embedding, exemplar.model_id))
    total = kept + named
    if len(total) > MAX_EXEMPLARS:
        raise VocabularyError(f"{len(total)} example images exceed the limit of {MAX_EXEMPLARS}")
    return Vocabulary(labels=validate_labels(labels, limits), templates=vocabulary.templates,
                      version=vocabulary.version, exemplars=tuple(total))


def save_vocabulary(vocabulary: Vocabulary, path: str) -> None:
    """Persist atomically (write, then rename), so a crash mid-write never leaves a broken file."""
    import json
    import os

    tmp = f"{path}.tmp"
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(tmp, "w") as handle:
        json.dump({"labels": list(vocabulary.labels), "prompt_templates": list(vocabulary.templates),
                   "vocabulary_version": vocabulary.version,
                   "exemplars": [{"label": e.label, "model": e.model_id, "embedding": list(e.embedding)}
                                 for e in vocabulary.exemplars]}, handle)
    os.replace(tmp, path)


def load_vocabulary(path: str, limits: VocabularyLimits = VocabularyLimits()) -> Vocabulary:
    """Read a persisted vocabulary; VocabularyError if missing fields or invalid (the caller falls back)."""
    import json

    try:
        with open(path) as handle:
            data = json.load(handle)
        labels = validate_labels(data["labels"], limits)
        templates = validate_templates(data["prompt_templates"], limits)
        version = data["vocabulary_version"]
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
            raise ValueError(f"vocabulary_version must be an integer in [1, {MAX_VERSION}], got {version!r}")
        exemplars = tuple(Exemplar(str(e["label"]), tuple(float(v) for v in e["embedding"]), str(e["model"]))
                          for e in data.get("exemplars", []))
        if any(e.label not in labels for e in exemplars) or len(exemplars) > MAX_EXEMPLARS:
            raise ValueError("an example image belongs to no class of the vocabulary, or there are too many")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VocabularyError(f"cannot restore the vocabulary from {path}: {exc}") from exc
    return Vocabulary(labels=labels, templates=templates, version=version, exemplars=exemplars)
