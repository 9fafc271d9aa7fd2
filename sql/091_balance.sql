-- balance: every image with its group path, per-image weight, folder probability and multiply.
select g.key, g.path, f.image_weight as weight, f.probability, f.multiply
from groups g
join balance_folders f on f.path = g.path
