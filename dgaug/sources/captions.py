"""Captions of the demo's toy images: a natural sentence naming style, colour and shape."""

import numpy as np

from dgaug.sources.drawing import PHOTO_SETTINGS

_CAPTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "photo": (
        "a photo of {obj}",
        "a photograph of {obj}",
        "a close-up photo of {obj}",
        "a snapshot of {obj}",
    ),
    "sketch": (
        "a pencil sketch of {obj}",
        "a pencil drawing of {obj}",
        "a black and white sketch of {obj}",
        "a hand-drawn sketch of {obj}",
        "a rough sketch of {obj} on paper",
    ),
    "cartoon": (
        "a cartoon drawing of {obj}",
        "a cartoon of {obj}",
        "a flat cartoon illustration of {obj}",
        "a clip art cartoon of {obj}",
    ),
    "painting": (
        "an oil painting of {obj}",
        "a painting of {obj}",
        "an impressionist painting of {obj}",
        "a brushstroke painting of {obj}",
    ),
}


def _with_article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def make_caption(
    label: str,
    style: str,
    color_name: str | None,
    rng: np.random.Generator,
    *,
    setting: str | None = None,
) -> str:
    """A short natural caption naming style and object, e.g. "an oil painting of a red star".

    Sketch captions leave out the colour because sketches are drawn in graphite only. `setting`
    is the photo background kind or the cartoon background colour, mentioned now and then.
    """
    noun = label.replace("_", " ")
    if color_name and style != "sketch":
        noun = f"{color_name} {noun}"
    templates = _CAPTION_TEMPLATES.get(style, ("{obj} in " + style.replace("_", " ") + " style",))
    caption = templates[int(rng.integers(len(templates)))].format(obj=_with_article(noun))
    if setting is not None and rng.random() < 0.5:
        if style == "photo" and setting in PHOTO_SETTINGS:
            caption += " " + PHOTO_SETTINGS[setting]
        elif style == "cartoon":
            caption += f" on a light {setting} background"
    return caption
