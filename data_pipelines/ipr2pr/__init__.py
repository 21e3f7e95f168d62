"""TFDS builder for InstructPix2Pix's edit pairs (IPr2Pr), from the folder release or the parquet copy."""

from data_pipelines.ipr2pr.ipr2pr import Ipr2pr, Ipr2prConfig, build
