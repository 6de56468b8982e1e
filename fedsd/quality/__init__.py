"""Federated image-quality evaluation: FID, KID and CLIP score of the global adapter,
computed on each node against its own held-out images, pooled by the server.

Layout (one concern per module; stdlib-only at import, torch comes in where it is used):

* ``config``: ``QualityConfig``, the ``eval-*`` keys of the run config, validated;
* ``extractors``: the feature extractors (Inception, CLIP): where a node finds them,
  ``fedsd fetch-extractors``, and the tiny random stand-ins of ``fedsd tiny-model``;
* ``node``: what a node computes (images from its validation prompts, feature moments);
* ``pooled``: what the server does with it (checks each node's statistics, pools them);
* ``report``: ``fedsd report OUT``, the quality-vs-privacy table of a run.
"""

#: The message type of a quality evaluation: ``evaluate`` with the ClientApp action ``quality``.
MESSAGE_TYPE = "evaluate.quality"
