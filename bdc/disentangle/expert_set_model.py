"""The expert set's pyfunc as MLflow logs it: from this file, not pickled (MLflow's
"models from code"). A pickled model object runs whatever its bytes say when a version is
loaded; this file is copied into the version and run by MLflow when it loads one, which is
its only use (nothing imports it: setting the model is its side effect)."""

from mlflow.models import set_model

from bdc.disentangle.registry import ExpertSetModel

set_model(ExpertSetModel())
