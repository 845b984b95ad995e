"""Everything between a user's images and a training batch: where a source is listed and opened (``sources``,
``class_folders``, ``layout``), how images are decoded and augmented (``imaging``), the items a run skipped
(``skiplog``), the decoded-image and feature caches (``cache``, ``features``), the Ray Data pipelines
(``pipelines``), and which of them a run takes (``plan``)."""
