"""Nipype workflow factories (nipreps style): they build graphs, nothing else.

BIDS queries live in :mod:`fednipype.bids`; running workflows and reporting their failures in
:mod:`fednipype.cli`.
"""
