"""What an index's vectors are: one value for the bundle they were made with, checked at every open.

An index stores frozen image features (of one image encoder and preprocessing: the image fingerprint)
and search vectors (Head_B of them: the heads fingerprint). `IndexIdentity.of(bundle)` is that identity
for a bundle; `open_index(path, identity, mode)` (access.py) checks it against the catalogue's meta:

* another image fingerprint, or features of another size: refused (IndexMismatchError), since every
  photo would have to be decoded again (`uclip index --rebuild` does that on purpose);
* other heads: the index needs re-projection (Head_B again over the stored features; no photo decoded),
  which a writer does before it adds anything;
* same heads, other search size: the catalogue contradicts itself (IndexCorruptError).

A field left None is not checked (a reader that only lists files, `uclip check`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from .catalogue import FORMAT_VERSION
from .errors import IndexCorruptError, IndexMismatchError

if TYPE_CHECKING:
    from ..bundle import Bundle


@dataclass(frozen=True)
class IndexIdentity:
    image_fingerprint: str | None = None
    heads_fingerprint: str | None = None
    d_clip: int | None = None
    d_search: int | None = None
    label: str = ""            # the bundle's location, named in messages
    unit_rows: bool = True     # every row is a unit vector (uclip's encoders normalise): another norm is damage

    @classmethod
    def of(cls, bundle: Bundle) -> IndexIdentity:
        """The identity of the vectors `bundle` makes: its fingerprints and sizes."""
        d_search = bundle.dims["shared"] if bundle.has_heads else bundle.dims["clip"]
        return cls(bundle.image_fingerprint, bundle.heads_fingerprint, int(bundle.dims["clip"]), int(d_search),
                   str(bundle.path))

    @property
    def complete(self) -> bool:
        return None not in (self.image_fingerprint, self.heads_fingerprint, self.d_clip, self.d_search)

    def new_meta(self) -> dict[str, str]:
        """The meta values an index made for this identity starts with."""
        if not self.complete:
            raise ValueError("creating an index needs image_fingerprint, heads_fingerprint, d_clip and d_search")
        return {"format_version": str(FORMAT_VERSION), "image_fingerprint": self.image_fingerprint,
                "heads_fingerprint": self.heads_fingerprint, "bundle_label": self.label,
                "d_clip": str(int(self.d_clip)), "d_search": str(int(self.d_search)),
                "unit_rows": "1" if self.unit_rows else "0"}

    def needs_reprojection(self, folder: Path, meta: Mapping[str, str]) -> bool:
        """Check the index's meta against this identity (see the module docstring); True when its search
        vectors belong to other heads."""
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise IndexMismatchError(
                f"index {folder} has format version {meta.get('format_version')}, this uclip reads "
                f"{FORMAT_VERSION}: re-index into a new --index, or run `uclip index --rebuild`")
        if self.image_fingerprint is not None and self.image_fingerprint != meta["image_fingerprint"]:
            built_by = meta.get("bundle_label") or "another bundle"
            current = f" ({self.label})" if self.label else ""
            raise IndexMismatchError(
                f"index {folder} was built with {built_by} (image fingerprint {meta['image_fingerprint']}), "
                f"not with this bundle{current} (image fingerprint {self.image_fingerprint}): "
                "re-index into a new --index, or run `uclip index --rebuild` to replace it")
        if self.d_clip is not None and int(self.d_clip) != int(meta["d_clip"]):
            raise IndexMismatchError(
                f"index {folder} stores {meta['d_clip']}-d features, the bundle gives {self.d_clip}-d: "
                "re-index into a new --index, or run `uclip index --rebuild`")
        if self.heads_fingerprint is not None and self.heads_fingerprint != meta["heads_fingerprint"]:
            return True
        if self.d_search is not None and int(self.d_search) != int(meta["d_search"]):
            raise IndexCorruptError(
                f"index {folder}: its catalogue says {meta['d_search']}-d search vectors, but the heads they were made "
                f"with give {self.d_search}-d (the catalogue is damaged, and a plain `uclip index` refuses it): "
                "run `uclip index --rebuild` (embeds every photo again), or restore the index from a backup")
        return False
