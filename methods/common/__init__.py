"""Parts shared by several methods: Sinkhorn, heads, EMA, schedules, distributed helpers, view geometry."""
