# camvid-seg: the TFRecords builder, trainer, evaluator, predictor and tuner on TensorFlow's
# official GPU image (the TensorFlow version of setup.py). The entrypoint is `python3 -m`, so the
# first argument names the module to run:
#   docker build -t camvid-seg .
#   docker run --rm camvid-seg                      # no args: the trainer's embedded demo
#   docker run --rm camvid-seg trainer.task --config small --data_dir D --model_dir M
#   docker run --rm camvid-seg tfrecords_builder --input_dir D --output_dir D
#   docker run --rm camvid-seg trainer.evaluate --model_dir M --data_dir D --split test
#   docker run --rm camvid-seg tuning.tune --data_dir D --output_dir O --config small ...
#   docker run --rm -p 6006:6006 camvid-seg tensorboard.main --logdir M/logs --bind_all
# TensorBoard comes with its profiler plugin (tensorboard-plugin-profile, of the image's TensorFlow
# release), so traces written with the trainer's --profile_steps open in its Profile tab.
# Only setup.py and the packages are copied in (.dockerignore): no tests, data or runs.
ARG TF_VERSION=2.21.0
FROM tensorflow/tensorflow:${TF_VERSION}-gpu

ARG TF_VERSION
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_BREAK_SYSTEM_PACKAGES=1

COPY . /tmp/camvid-seg
# Asking for the image's own TensorFlow keeps pip from replacing its CUDA build. Importing each
# entry module (one process each: they define absl flags of the same names) fails the build,
# not the first pod, if a module or a dependency is missing; so does a profiler plugin that
# TensorBoard would not load (its `profile` entry point and the plugin module it imports).
RUN python3 -m pip install "tensorflow==${TF_VERSION}" "tensorboard-plugin-profile>=2.21,<2.22" \
        /tmp/camvid-seg \
    && rm -rf /tmp/camvid-seg \
    && cd / \
    && for module in trainer.task trainer.evaluate trainer.predict tuning.tune \
                     tfrecords_builder.__main__ tfrecords_builder.synthetic \
                     tfrecords_builder.folds tensorboard.main; do \
         python3 -c "import ${module}" || exit 1; \
       done \
    && python3 -c "from tensorboard import default; \
                   loaders = [p.__name__ for p in default.get_dynamic_plugins()]; \
                   assert 'ProfilePluginLoader' in loaders, loaders; \
                   import xprof.profile_plugin"

# A fixed, numeric, non-root user: the Kubernetes manifests run as 10001:10001 with runAsNonRoot.
RUN groupadd --gid 10001 camvid \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/camvid --shell /bin/bash \
        camvid
USER 10001:10001
WORKDIR /home/camvid

# 2222: TensorFlow worker gRPC (CAMVID_WORKER_PORT); 8000: KerasTuner oracle; 6006: TensorBoard.
EXPOSE 2222 8000 6006
ENTRYPOINT ["python3", "-m"]
CMD ["trainer.task"]
