"""Parts with two or more method users, written once: the EMA teacher (``teacher``), global means and all-reduces
(``dist``), crop batching (``crops``), prototypes, Sinkhorn and queues, DINO's head and loss, schedules, view
geometry, global BatchNorm, ViT last-block features. A part only one method uses lives in that method's package."""
