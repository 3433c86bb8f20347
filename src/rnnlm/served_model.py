"""The served model as code: MLflow runs this file to build the pyfunc model it loads.

MLflow's "models from code" (mlflow.pyfunc.log_model(python_model=<this file>)): the logged
model holds this file, not a pickle, and MLflow executes it when it loads the model, after
putting the model's `code/` folder (the rnnlm modules of rnnlm.serving.SERVED_MODULES) first on
sys.path. Not a module to import: executing it is its whole purpose.
"""

import mlflow

from rnnlm.serving import TextModel

mlflow.models.set_model(TextModel())
