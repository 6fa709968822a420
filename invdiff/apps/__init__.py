"""Applications above the library: what the ``invdiff`` commands run.

* :mod:`invdiff.apps.demo` — ``invdiff demo``: the shipped priors on held-out images, and
  the analytic demo against the exact posterior;
* :mod:`invdiff.apps.workflows` — ``invdiff simulate`` / ``invdiff reconstruct``: medical
  scans (DICOM, NIfTI, fastMRI, PNG/TIFF) to measurements, reconstructions and back, with
  provenance.

This layer may import every library layer (``operators``, ``priors``, ``samplers``, ``io``,
``bench``, ``train``, ``data``); none of them imports it.
"""
