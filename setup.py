"""Packaging for camvid-seg: builder, trainer, tuner, shared camvid_common, console scripts."""

import setuptools

setuptools.setup(
    name='camvid-seg',
    version='0.1.0',
    description='Distributed U-Net training for CamVid semantic segmentation on GPU clusters.',
    python_requires='>=3.10',
    packages=setuptools.find_packages(
        include=['camvid_common*', 'tfrecords_builder*', 'trainer*', 'tuning*']),
    include_package_data=True,
    install_requires=[
        'tensorflow>=2.21,<2.22',
        'keras>=3.10,<4',
        # [bayesian]: scikit-learn + scipy for --tuner bayesian.
        'keras-tuner[bayesian]>=1.4.7,<2',
        'google-cloud-storage>=2.18',
        'numpy>=1.26',
        'tensorboard>=2.21,<2.22',
        'absl-py>=2.1',
        # Fast PNG decode/encode in the builder's worker processes without a TF runtime each.
        'pillow>=10',
        # trainer.task --params_override: YAML values and .yaml files of config overrides.
        'PyYAML>=6',
    ],
    extras_require={
        'test': [
            'pytest>=8',
            'pytest-timeout>=2.3',
            # tests/test_gcs.py: scripts/gcs_emulator.py patches this emulator's internals, so
            # the version is pinned; cryptography makes the proxy's throwaway TLS certificates.
            'gcp-storage-emulator==2026.7.19',
            'cryptography>=42',
            'requests>=2.31',
            'kubernetes-validate>=1.31',
            'docker>=7',  # Only to apply .dockerignore rules offline; no engine needed.
        ],
    },
    entry_points={
        'console_scripts': [
            'camvid-build-tfrecords=tfrecords_builder.__main__:run',
            'camvid-synthetic=tfrecords_builder.synthetic:run',
            'camvid-folds=tfrecords_builder.folds:run',
            'camvid-train=trainer.task:run',
            'camvid-evaluate=trainer.evaluate:run',
            'camvid-predict=trainer.predict:run',
            'camvid-tune=tuning.tune:run',
        ],
    },
)
