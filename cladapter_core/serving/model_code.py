"""The code of a logged CLAdapter model (MLflow "models from code", see pyfunc.py): MLflow
runs this file when it loads the model, with the model's copy of cladapter_core on sys.path."""
from mlflow.models import set_model

from cladapter_core.serving.pyfunc import CLAdapterPyfunc

set_model(CLAdapterPyfunc())
