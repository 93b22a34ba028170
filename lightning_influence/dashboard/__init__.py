"""The Influence dashboard: a TensorBoard plugin (an "Influence" tab) that reads the callback's reports.

A reader, not a writer: it serves what ``InfluenceCallback`` (and ``lightning-influence``) already wrote under
each run's ``influence/`` directory. TensorBoard loads :class:`~lightning_influence.dashboard.plugin.InfluencePlugin`
through the ``tensorboard_plugins`` entry point; :class:`~lightning_influence.dashboard.data.InfluenceData`
reads the files without TensorBoard. See ``docs/tensorboard.md``.
"""
