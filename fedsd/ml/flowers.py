"""Oxford Flowers 102 class names and the text prompts built from dataset labels.

The hub copy of the dataset (``nkirschi/oxford-flowers``) stores its labels as a
``ClassLabel`` whose names are the *official class ids as strings*, sorted
lexicographically ('1', '10', '100', '101', '102', '11', ...). The label index is
therefore not the class id: ``official_id = int(names[index])``. Everything that turns a
label into a prompt goes through this module so that the mapping lives in one place.

Stdlib only: the ClientApp imports it on every round.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT_DATASET = "nkirschi/oxford-flowers"
"""Hub id of the Oxford Flowers 102 copy we train on (formerly ``nelorth/oxford-flowers``)."""

# Official order: position i holds official class id i + 1 (the same order as the
# ``oxford_flowers102`` ClassLabel of TensorFlow Datasets, which is 0-based).
OXFORD_FLOWERS_CLASS_NAMES: tuple[str, ...] = (
    "pink primrose",
    "hard-leaved pocket orchid",
    "canterbury bells",
    "sweet pea",
    "english marigold",
    "tiger lily",
    "moon orchid",
    "bird of paradise",
    "monkshood",
    "globe thistle",
    "snapdragon",
    "colt's foot",
    "king protea",
    "spear thistle",
    "yellow iris",
    "globe-flower",
    "purple coneflower",
    "peruvian lily",
    "balloon flower",
    "giant white arum lily",
    "fire lily",
    "pincushion flower",
    "fritillary",
    "red ginger",
    "grape hyacinth",
    "corn poppy",
    "prince of wales feathers",
    "stemless gentian",
    "artichoke",
    "sweet william",
    "carnation",
    "garden phlox",
    "love in the mist",
    "mexican aster",
    "alpine sea holly",
    "ruby-lipped cattleya",
    "cape flower",
    "great masterwort",
    "siam tulip",
    "lenten rose",
    "barbeton daisy",
    "daffodil",
    "sword lily",
    "poinsettia",
    "bolero deep blue",
    "wallflower",
    "marigold",
    "buttercup",
    "oxeye daisy",
    "common dandelion",
    "petunia",
    "wild pansy",
    "primula",
    "sunflower",
    "pelargonium",
    "bishop of llandaff",
    "gaura",
    "geranium",
    "orange dahlia",
    "pink-yellow dahlia?",
    "cautleya spicata",
    "japanese anemone",
    "black-eyed susan",
    "silverbush",
    "californian poppy",
    "osteospermum",
    "spring crocus",
    "bearded iris",
    "windflower",
    "tree poppy",
    "gazania",
    "azalea",
    "water lily",
    "rose",
    "thorn apple",
    "morning glory",
    "passion flower",
    "lotus",
    "toad lily",
    "anthurium",
    "frangipani",
    "clematis",
    "hibiscus",
    "columbine",
    "desert-rose",
    "tree mallow",
    "magnolia",
    "cyclamen",
    "watercress",
    "canna lily",
    "hippeastrum",
    "bee balm",
    "ball moss",
    "foxglove",
    "bougainvillea",
    "camellia",
    "mallow",
    "mexican petunia",
    "bromelia",
    "blanket flower",
    "trumpet creeper",
    "blackberry lily",
)

NUM_CLASSES = len(OXFORD_FLOWERS_CLASS_NAMES)

GENERIC_PROMPT = "a photo of a flower"
"""Prompt for an image that has neither a caption nor a label."""


def flower_name(official_id: int) -> str:
    """Name of an official (1-based) Oxford Flowers class id; raises on an unknown id."""
    if not 1 <= official_id <= NUM_CLASSES:
        raise ValueError(f"Oxford Flowers class ids are 1..{NUM_CLASSES}, got {official_id}")
    return OXFORD_FLOWERS_CLASS_NAMES[official_id - 1]


def prompt_for_label_name(name: str) -> str:
    """The training prompt for a class, in the CLIP zero-shot template for this dataset.

    The official list's trailing '?' ("pink-yellow dahlia?") is an annotation doubt,
    not part of the name, so it is left out of the prompt.
    """
    subject = name.strip().rstrip("?").strip()
    if not subject:
        return GENERIC_PROMPT
    return f"a photo of a {subject}, a type of flower"


def _names_of(class_label: Any) -> Sequence[str]:
    """Accept a ``datasets.ClassLabel`` (anything with ``.names``) or a plain name list."""
    names = getattr(class_label, "names", class_label)
    return [str(n) for n in names]


def is_oxford_id_names(names: Sequence[str]) -> bool:
    """True when every label name is an official class id as a string ('1'..'102').

    That is how the hub copy names its classes; any other naming (for example an
    owner's own folder names such as "tulip") is used as the subject verbatim.
    """
    if not names:
        return False
    for name in names:
        if not (name.isascii() and name.isdigit()) or not 1 <= int(name) <= NUM_CLASSES:
            return False
    return True


def label_display_name(class_label: Any, index: int) -> str:
    """Human-readable class name for a label index of a ``ClassLabel`` (or name list).

    With digit-string names ('1'..'102') the name at ``index`` is the official class
    id, so ``'10'`` gives "globe thistle"; otherwise the name itself is returned.
    """
    names = _names_of(class_label)
    if not 0 <= index < len(names):
        raise ValueError(f"label index {index} is outside 0..{len(names) - 1}")
    if is_oxford_id_names(names):
        return flower_name(int(names[index]))
    return names[index]


def prompt_for_label(class_label: Any, index: int) -> str:
    """The prompt for a label index of a ``ClassLabel`` (or name list)."""
    return prompt_for_label_name(label_display_name(class_label, index))


def class_table(class_label: Any) -> list[dict[str, Any]]:
    """index -> source name -> display name -> prompt, for manifests and logs."""
    names = _names_of(class_label)
    oxford = is_oxford_id_names(names)
    table = []
    for index, name in enumerate(names):
        label_name = flower_name(int(name)) if oxford else name
        table.append(
            {
                "index": index,
                "name": name,
                "label_name": label_name,
                "prompt": prompt_for_label_name(label_name),
            }
        )
    return table
