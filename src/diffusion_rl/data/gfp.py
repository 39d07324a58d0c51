"""GFP (avGFP, Sarkisyan et al. 2016) protein-level proxy for design-bench GFP.

What is loaded (see ``shared/data/gfp/PROVENANCE.md``): the amino-acid-level table
``amino_acid_genotypes_to_brightness.tsv`` (54,025 genotypes as mutation lists against
avGFP) and the 714-nt reference ``avGFP_reference_sequence.fa`` (starts at codon 2,
ends with a stop). Translating the reference gives 237 aa; applying each genotype's
mutations and dropping those containing a stop ``*`` leaves 51,715 unique proteins.

This is **not** design-bench's GFP (its shards hold 56,086 nucleotide-level rows with
repeated proteins and are not available offline), hence the dataset name
``gfp_sarkisyan2016_proxy``. y is ``medianBrightness`` (log10 fluorescence), the same
scale design-bench uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffusion_rl.data.checksums import verify_files
from diffusion_rl.data.sequences import SequenceData

__all__ = [
    "GFP_ALPHABET",
    "GFP_LENGTH",
    "GFP_FILES",
    "GFP_NAME",
    "CODON_TABLE",
    "GFPFormatError",
    "translate",
    "load_gfp_reference",
    "load_gfp",
    "gfp_elegant_train_split",
]

GFP_ALPHABET = "ACDEFGHIKLMNPQRSTVWY"
GFP_LENGTH = 237
GFP_NAME = "gfp_sarkisyan2016_proxy"
_TSV = "amino_acid_genotypes_to_brightness.tsv"
_FASTA = "avGFP_reference_sequence.fa"
GFP_FILES = [_TSV, _FASTA]

# Standard genetic code (NCBI translation table 1), written out so the translation does
# not depend on an optional bioinformatics package. "*" marks the three stop codons.
CODON_TABLE: dict[str, str] = {
    "TTT": "F", "TTC": "F", "TTA": "L", "TTG": "L",
    "TCT": "S", "TCC": "S", "TCA": "S", "TCG": "S",
    "TAT": "Y", "TAC": "Y", "TAA": "*", "TAG": "*",
    "TGT": "C", "TGC": "C", "TGA": "*", "TGG": "W",
    "CTT": "L", "CTC": "L", "CTA": "L", "CTG": "L",
    "CCT": "P", "CCC": "P", "CCA": "P", "CCG": "P",
    "CAT": "H", "CAC": "H", "CAA": "Q", "CAG": "Q",
    "CGT": "R", "CGC": "R", "CGA": "R", "CGG": "R",
    "ATT": "I", "ATC": "I", "ATA": "I", "ATG": "M",
    "ACT": "T", "ACC": "T", "ACA": "T", "ACG": "T",
    "AAT": "N", "AAC": "N", "AAA": "K", "AAG": "K",
    "AGT": "S", "AGC": "S", "AGA": "R", "AGG": "R",
    "GTT": "V", "GTC": "V", "GTA": "V", "GTG": "V",
    "GCT": "A", "GCC": "A", "GCA": "A", "GCG": "A",
    "GAT": "D", "GAC": "D", "GAA": "E", "GAG": "E",
    "GGT": "G", "GGC": "G", "GGA": "G", "GGG": "G",
}  # fmt: skip

# Byte -> token lookup; 255 marks letters outside the alphabet ("*" included).
_STOP_TOKEN = 255
_LETTER_TO_TOKEN = np.full(256, _STOP_TOKEN, dtype=np.uint8)
_LETTER_TO_TOKEN[np.frombuffer(GFP_ALPHABET.encode(), dtype=np.uint8)] = np.arange(
    len(GFP_ALPHABET), dtype=np.uint8
)


class GFPFormatError(ValueError):
    """The GFP table or reference does not have the documented format."""


def _resolve_folder(data_dir: Path | str) -> Path:
    """Accept either the ``gfp`` folder itself or the shared-data root above it."""
    folder = Path(data_dir)
    if not (folder / _TSV).exists() and (folder / "gfp").is_dir():
        folder = folder / "gfp"
    return folder


def translate(nucleotides: str) -> str:
    """Translate a coding DNA string (length a multiple of 3) with :data:`CODON_TABLE`."""
    seq = nucleotides.upper()
    if len(seq) % 3:
        raise GFPFormatError(f"coding sequence length {len(seq)} is not a multiple of 3")
    try:
        return "".join(CODON_TABLE[seq[i : i + 3]] for i in range(0, len(seq), 3))
    except KeyError as err:
        raise GFPFormatError(f"invalid codon {err.args[0]!r} in reference sequence") from None


def _read_fasta_single(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines or not lines[0].startswith(">") or any(ln.startswith(">") for ln in lines[1:]):
        raise GFPFormatError(f"{path}: expected exactly one FASTA record")
    return "".join(lines[1:])


def _reference_protein(folder: Path) -> str:
    """237-aa avGFP translation (trailing stop removed)."""
    protein = translate(_read_fasta_single(folder / _FASTA))
    if not protein.endswith("*") or "*" in protein[:-1] or len(protein) - 1 != GFP_LENGTH:
        raise GFPFormatError(
            f"{folder / _FASTA}: expected {GFP_LENGTH} aa followed by one stop, got {protein!r}"
        )
    return protein[:-1]


def load_gfp_reference(data_dir: Path | str) -> torch.Tensor:
    """avGFP reference (wild type) as tokens.

    Args:
        data_dir: the ``shared/data/gfp`` folder (or ``shared/data`` itself).

    Returns:
        ``LongTensor[237]`` over :data:`GFP_ALPHABET`.
    """
    folder = _resolve_folder(data_dir)
    verify_files(folder, [_FASTA])
    return torch.from_numpy(_encode(_reference_protein(folder)).astype(np.int64))


def _encode(protein: str) -> np.ndarray:
    """``uint8[L]`` tokens; letters outside the alphabet (e.g. ``*``) become 255."""
    return _LETTER_TO_TOKEN[np.frombuffer(protein.encode("ascii"), dtype=np.uint8)]


def _read_table(path: Path) -> tuple[list[str], np.ndarray]:
    """Mutation strings ``[N]`` and ``float32[N]`` medianBrightness from the TSV."""
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    if header[:3] != ["aaMutations", "uniqueBarcodes", "medianBrightness"]:
        raise GFPFormatError(f"{path}: unexpected header {header}")
    rows = [ln.split("\t") for ln in lines[1:] if ln]
    mutations = [r[0] for r in rows]
    y = np.array([float(r[2]) for r in rows], dtype=np.float32)
    return mutations, y


def _parse_mutations(mutations: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flatten ``S<wt><pos><mut>`` lists into parallel arrays (row, pos, wt byte, mut byte)."""
    row_ids: list[int] = []
    items: list[str] = []
    for i, field in enumerate(mutations):
        if field:
            parts = field.split(":")
            items.extend(parts)
            row_ids.extend([i] * len(parts))
    bad = [m for m in items if len(m) < 4 or m[0] != "S" or not m[2:-1].isdigit()]
    if bad:
        raise GFPFormatError(f"mutations not in 'S<wt><pos><mut>' format, e.g. {bad[:3]}")
    pos = np.fromiter((int(m[2:-1]) for m in items), dtype=np.int64, count=len(items))
    wt = np.frombuffer("".join(m[1] for m in items).encode("ascii"), dtype=np.uint8)
    mut = np.frombuffer("".join(m[-1] for m in items).encode("ascii"), dtype=np.uint8)
    return np.asarray(row_ids, dtype=np.int64), pos, wt, mut


def _check_wild_type(pos: np.ndarray, wt: np.ndarray, reference: str, items_hint: str) -> None:
    """Every mutation's stated wild-type letter must match the translated reference."""
    if pos.size and (pos.min() < 0 or pos.max() >= GFP_LENGTH):
        raise GFPFormatError(f"mutation position outside 0..{GFP_LENGTH - 1} in {items_hint}")
    ref_bytes = np.frombuffer(reference.encode("ascii"), dtype=np.uint8)
    mismatch = np.flatnonzero(ref_bytes[pos] != wt)
    if mismatch.size:
        k = int(mismatch[0])
        raise GFPFormatError(
            f"{items_hint}: {mismatch.size} mutations name a wild-type letter that does not "
            f"match the 0-based 237-aa reference translation; first: position {int(pos[k])} "
            f"says {chr(wt[k])!r} but the reference has {reference[pos[k]]!r}"
        )


def _apply_mutations(
    reference: str, n_rows: int, rows: np.ndarray, pos: np.ndarray, mut: np.ndarray
) -> np.ndarray:
    """``uint8[N, 237]`` tokens; rows containing a stop carry 255 somewhere."""
    tokens = np.tile(_encode(reference), (n_rows, 1))
    tokens[rows, pos] = _LETTER_TO_TOKEN[mut]
    unknown = (_LETTER_TO_TOKEN[mut] == _STOP_TOKEN) & (mut != ord("*"))
    if unknown.any():
        raise GFPFormatError(f"unknown amino-acid letter {chr(mut[np.flatnonzero(unknown)[0]])!r}")
    return tokens


def load_gfp(data_dir: Path | str) -> SequenceData:
    """Load the Sarkisyan 2016 avGFP table as full 237-aa sequences (stop-free genotypes).

    Steps: verify checksums; translate the reference (714 nt -> 237 aa + stop); parse
    ``S<wt><pos><mut>`` mutations (0-based positions into the 237-aa translation) and
    check every wild-type letter; apply them in one vectorised scatter; drop the 2,310
    genotypes that contain a stop. Row order follows the TSV (row 0 is wild type).

    Args:
        data_dir: the ``shared/data/gfp`` folder (or ``shared/data`` itself).

    Returns:
        ``SequenceData`` named ``gfp_sarkisyan2016_proxy`` with ``tokens``
        ``LongTensor[51715, 237]`` over ``ACDEFGHIKLMNPQRSTVWY`` and ``y``
        ``FloatTensor[51715]`` = medianBrightness (log10 fluorescence).
    """
    folder = _resolve_folder(data_dir)
    verify_files(folder, GFP_FILES)
    reference = _reference_protein(folder)
    mutations, y = _read_table(folder / _TSV)
    rows, pos, wt, mut = _parse_mutations(mutations)
    _check_wild_type(pos, wt, reference, str(folder / _TSV))
    tokens = _apply_mutations(reference, len(mutations), rows, pos, mut)
    # A premature stop truncates the protein, so it has no 237-aa representation.
    keep = ~(tokens == _STOP_TOKEN).any(axis=1)
    return SequenceData(
        tokens=torch.from_numpy(tokens[keep].astype(np.int64)),
        y=torch.from_numpy(y[keep]),
        alphabet=GFP_ALPHABET,
        name=GFP_NAME,
    )


def gfp_elegant_train_split(
    data: SequenceData, top_fraction: float, max_samples: int | None = None
) -> SequenceData:
    """Training set for ELEGANT's GFP experiments: the top ``top_fraction`` of rows by y.

    ELEGANT (Uehara et al. 2024), App. F.1.1, GFP: "For our experiments, we selected the
    top samples following (Trabucco et al., 2022) and trained diffusion models and oracles
    using this selected dataset." The number of samples / percentile was lost in the text
    extraction, so the fraction is an argument. Selection mirrors design-bench's
    ``DatasetBuilder.subsample``, which thresholds on ``np.percentile``: keep rows with
    ``y >= np.percentile(y, 100 * (1 - top_fraction))`` (ties at the threshold are kept).

    Note that design-bench's own ``GFP-Transformer-v0`` registration uses
    ``max_samples=5000, min_percentile=50, max_percentile=60`` (a middle band, not the
    top); ELEGANT says "top", so that is what is implemented here. ``max_samples``
    optionally caps the size the way design-bench's GFP does (5000), keeping the
    highest-y rows (stable sort, so the result is deterministic).

    Args:
        data: output of :func:`load_gfp`.
        top_fraction: fraction in ``(0, 1]`` of rows to keep, by descending y.
        max_samples: optional cap on the number of rows.

    Returns:
        ``SequenceData`` with ``tokens`` ``[M, 237]`` and ``y`` ``[M]``, rows in the
        original (TSV) order.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    y = data.y.numpy().astype(np.float64)
    threshold = np.percentile(y, 100.0 * (1.0 - top_fraction))
    keep = np.flatnonzero(y >= threshold)
    if max_samples is not None and keep.size > max_samples:
        order = np.argsort(-y[keep], kind="stable")[:max_samples]
        keep = np.sort(keep[order])
    name = f"{data.name}_top{top_fraction:g}" + ("" if max_samples is None else f"_max{max_samples}")
    return data.subset(torch.from_numpy(keep), name=name)
