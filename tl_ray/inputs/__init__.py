"""Everything between a user's images and a training batch: where a source is recognised, listed and opened
(``sources``: a package, one module per source behind one recogniser; ``layout``: the listed dataset a run takes),
how images are decoded and augmented (``imaging``), the items a run skipped (``skiplog``), the decoded-image cache
(``cache``), held in a worker's memory (``held``) or streamed through Ray Data (``streaming``), the feature cache
(``features``), the Ray Data pipelines (``pipelines``), and which of them a run takes (``plan``)."""
