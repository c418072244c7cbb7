"""CIFAR-100 constants, in one place (names, label hierarchy, normalization, file names).

Mean/std are per RGB channel on the 0-255 scale (the usual CIFAR-100 training-set statistics),
so the loaders normalize uint8 pixels directly: ``(x - mean) / std``.
"""
from model.project import IMAGE_SIZE  # standard library only (no torch)

IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)  # H, W, C as stored in the .beton files (uint8, RGB)
NUM_FINE = 100
NUM_COARSE = 20

CIFAR100_MEAN = (129.304, 124.070, 112.434)  # 0-255 scale
CIFAR100_STD = (68.170, 65.392, 70.418)  # 0-255 scale

# Official download (https://www.cs.toronto.edu/~kriz/cifar.html)
CIFAR100_URL = 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz'
CIFAR100_MD5 = 'eb9058c3a382ffc7106e4002c42a8d85'
ARCHIVE_NAME = 'cifar-100-python.tar.gz'
ARCHIVE_DIR = 'cifar-100-python'
SPLIT_SIZES = {'train': 50_000, 'test': 10_000}

BETON_NAMES = {'train': 'cifar100_train.beton', 'test': 'cifar100_test.beton'}
# The same images as uint8 numpy arrays (the loader for hosts without ffcv reads these)
ARRAY_NAMES = {'train': 'cifar100_train.npy', 'test': 'cifar100_test.npy'}
MANIFEST_NAME = 'manifest.json'

FINE_LABEL_NAMES = (
    'apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle', 'bicycle',
    'bottle', 'bowl', 'boy', 'bridge', 'bus', 'butterfly', 'camel', 'can', 'castle',
    'caterpillar', 'cattle', 'chair', 'chimpanzee', 'clock', 'cloud', 'cockroach', 'couch',
    'crab', 'crocodile', 'cup', 'dinosaur', 'dolphin', 'elephant', 'flatfish', 'forest', 'fox',
    'girl', 'hamster', 'house', 'kangaroo', 'keyboard', 'lamp', 'lawn_mower', 'leopard', 'lion',
    'lizard', 'lobster', 'man', 'maple_tree', 'motorcycle', 'mountain', 'mouse', 'mushroom',
    'oak_tree', 'orange', 'orchid', 'otter', 'palm_tree', 'pear', 'pickup_truck', 'pine_tree',
    'plain', 'plate', 'poppy', 'porcupine', 'possum', 'rabbit', 'raccoon', 'ray', 'road',
    'rocket', 'rose', 'sea', 'seal', 'shark', 'shrew', 'skunk', 'skyscraper', 'snail', 'snake',
    'spider', 'squirrel', 'streetcar', 'sunflower', 'sweet_pepper', 'table', 'tank',
    'telephone', 'television', 'tiger', 'tractor', 'train', 'trout', 'tulip', 'turtle',
    'wardrobe', 'whale', 'willow_tree', 'wolf', 'woman', 'worm',
)
COARSE_LABEL_NAMES = (
    'aquatic_mammals', 'fish', 'flowers', 'food_containers', 'fruit_and_vegetables',
    'household_electrical_devices', 'household_furniture', 'insects', 'large_carnivores',
    'large_man-made_outdoor_things', 'large_natural_outdoor_scenes',
    'large_omnivores_and_herbivores', 'medium_mammals', 'non-insect_invertebrates', 'people',
    'reptiles', 'small_mammals', 'trees', 'vehicles_1', 'vehicles_2',
)
# FINE_TO_COARSE[fine_label] = coarse_label (fixed by the dataset's hierarchy)
FINE_TO_COARSE = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13,
    15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4,
    17, 4, 2, 0, 17, 4, 18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13,
    15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)
