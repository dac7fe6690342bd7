"""Tuned libraries that ship with momtune: one JSON file per GPU model (and Triton version), as
written by ``momtune export``. With ``MOMTUNE_LIBRARY`` unset (or ``auto``) the dispatcher picks
the one whose provenance names this GPU and compute capability (:func:`momtune.dispatch.pick_shipped`);
``MOMTUNE_LIBRARY=none`` runs every template's defaults; a path runs that file."""
