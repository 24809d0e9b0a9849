"""The one table of structures KneeSeg segments: label value, name, colour, terminology.

Every output (segmentation file, surfaces, results.json, the Slicer scene) takes names, colours
and codes from :data:`TISSUES`. Terminology follows Slicer's segment ``TerminologyEntry`` tag:
``context~category~type~typeModifier~anatomicContext~anatomicRegion~anatomicRegionModifier``,
each coded item written ``CodingScheme^CodeValue^CodeMeaning`` (SNOMED-CT, designator ``SCT``).
Cartilage and menisci use the tissue types of Slicer's general anatomy list (category Tissue,
types Cartilage 309312004 and Meniscus 74135004) with the bone or the knee as anatomic region and
the side (medial/lateral) as its modifier; bones are Anatomical Structure types.
"""

from __future__ import annotations

from dataclasses import dataclass

TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"

ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

Code = tuple[str, str, str]  # (coding scheme designator, code value, code meaning)

ANATOMICAL_STRUCTURE: Code = ("SCT", "123037004", "Anatomical Structure")

TISSUE: Code = ("SCT", "85756007", "Tissue")

FEMUR: Code = ("SCT", "71341001", "Femur")

TIBIA: Code = ("SCT", "12611008", "Tibia")

PATELLA: Code = ("SCT", "64234005", "Patella")

FIBULA: Code = ("SCT", "87342007", "Fibula")

KNEE: Code = ("SCT", "72696002", "Knee")

CARTILAGE: Code = ("SCT", "309312004", "Cartilage")

MENISCUS: Code = ("SCT", "74135004", "Meniscus")

MEDIAL: Code = ("SCT", "255561001", "Medial")

LATERAL: Code = ("SCT", "49370004", "Lateral")


@dataclass(frozen=True)
class Tissue:
    """One segmented structure.

    Attributes
    ----------
    label : int
        Label value in every label map KneeSeg writes.
    key : str
        Short identifier used in file names and JSON keys (``femoral_cartilage``).
    name : str
        Segment name shown in Slicer.
    color : tuple of 3 floats
        RGB in [0, 1].
    group : str
        ``bone``, ``cartilage`` or ``meniscus``.
    category, type : Code
        Terminology category and type.
    region, region_modifier : Code or None
        Anatomic region and its modifier (side), where the type alone does not say where.
    """

    label: int
    key: str
    name: str
    color: tuple[float, float, float]
    group: str
    category: Code
    type: Code
    region: Code | None = None
    region_modifier: Code | None = None

    @property
    def terminology(self) -> str:
        """Slicer ``TerminologyEntry`` string for this structure."""

        def coded(code: Code | None) -> str:
            return "^".join(code) if code else "^^"

        return "~".join(
            [
                TERMINOLOGY_CONTEXT,
                coded(self.category),
                coded(self.type),
                coded(None),
                ANATOMIC_CONTEXT,
                coded(self.region),
                coded(self.region_modifier),
            ]
        )


def _rgb(r: int, g: int, b: int) -> tuple[float, float, float]:
    return (round(r / 255, 6), round(g / 255, 6), round(b / 255, 6))


# Label values follow the pymskt / OAI knee label maps shipped in Resources/SampleData, so the
# real anatomy there is already in KneeSeg's labelling. Colours: Slicer's terminology colours
# where they tell the structures apart (femoral cartilage, medial tibial cartilage, patellar
# cartilage, femur, lateral meniscus); elsewhere Slicer gives neighbours the same hue (femur and
# tibia both yellow, patella and tibial cartilage both salmon, medial meniscus and patellar
# cartilage both green), so those take distinct hues. Every pair differs by CIEDE2000 > 20
# (Testing/pipeline/test_report.py checks it).
TISSUES: tuple[Tissue, ...] = (
    Tissue(1, "femoral_cartilage", "Femoral cartilage", _rgb(111, 184, 210), "cartilage", TISSUE, CARTILAGE, FEMUR),
    Tissue(
        2,
        "medial_tibial_cartilage",
        "Medial tibial cartilage",
        _rgb(216, 101, 79),
        "cartilage",
        TISSUE,
        CARTILAGE,
        TIBIA,
        MEDIAL,
    ),
    Tissue(
        3,
        "lateral_tibial_cartilage",
        "Lateral tibial cartilage",
        _rgb(255, 140, 0),
        "cartilage",
        TISSUE,
        CARTILAGE,
        TIBIA,
        LATERAL,
    ),
    Tissue(4, "patellar_cartilage", "Patellar cartilage", _rgb(144, 238, 144), "cartilage", TISSUE, CARTILAGE, PATELLA),
    Tissue(5, "femur", "Femur", _rgb(241, 214, 145), "bone", ANATOMICAL_STRUCTURE, FEMUR),
    Tissue(6, "tibia", "Tibia", _rgb(70, 100, 200), "bone", ANATOMICAL_STRUCTURE, TIBIA),
    Tissue(7, "patella", "Patella", _rgb(220, 60, 170), "bone", ANATOMICAL_STRUCTURE, PATELLA),
    Tissue(8, "fibula", "Fibula", _rgb(120, 80, 50), "bone", ANATOMICAL_STRUCTURE, FIBULA),
    Tissue(9, "lateral_meniscus", "Lateral meniscus", _rgb(183, 156, 220), "meniscus", TISSUE, MENISCUS, KNEE, LATERAL),
    Tissue(10, "medial_meniscus", "Medial meniscus", _rgb(0, 140, 100), "meniscus", TISSUE, MENISCUS, KNEE, MEDIAL),
)

BY_LABEL: dict[int, Tissue] = {t.label: t for t in TISSUES}

BY_KEY: dict[str, Tissue] = {t.key: t for t in TISSUES}


def tissue(label_or_key: int | str) -> Tissue:
    """Look a structure up by label value or key; raises ``KeyError`` naming the valid ones."""
    if isinstance(label_or_key, int):
        found = BY_LABEL.get(label_or_key)
        known: list[int] | list[str] = sorted(BY_LABEL)
    else:
        found = BY_KEY.get(label_or_key)
        known = sorted(BY_KEY)
    if found is None:
        raise KeyError(f"unknown structure {label_or_key!r}; known: {known}")
    return found


def tissues_in_group(group: str) -> tuple[Tissue, ...]:
    return tuple(t for t in TISSUES if t.group == group)
