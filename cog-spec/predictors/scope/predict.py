from cog import BasePredictor, Input, current_scope


class Predictor(BasePredictor):
    def predict(
        self,
        n: int = Input(description="Steps to count", default=3, ge=0, le=10),
        key: str = Input(description="The context entry to return", default="user"),
        mode: str = Input(description="The mode `steps` is recorded with", default="incr"),
        value: str = Input(description="Recorded as `label` with incr when set", default=""),
    ) -> str:
        scope = current_scope()
        scope.metrics["tokens"] = n
        for i in range(n):
            scope.metrics.record("steps", 1, mode=mode)
            scope.metrics.record("seen", i, mode="append")
        scope.record_metric("temperature", 0.5)
        scope.metrics["gone"] = 1
        del scope.metrics["gone"]
        if value:
            scope.record_metric("label", value, mode="incr")
        context = scope.context
        return f"{type(context).__name__}:{context.get(key, '-')}:{','.join(sorted(context))}"
