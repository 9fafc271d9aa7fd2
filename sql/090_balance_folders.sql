-- balance_folders: sampling probability and multiply of every folder that holds images
-- (group_counts: path, n_images), by anime_screenshot_pipeline's balancing scheme:
-- from the root, each node shares its probability among its children in proportion to their
-- weights; a node with images of its own counts them as one more child with the node's own
-- weight. A node's weight (balance_weights: ord, pattern, weight): its folder name as a pattern,
-- else the first pattern (in file order) that fnmatch-es its path (DuckDB GLOB), else 1.
-- per-image weight = probability / images in the folder; multiply = per-image weight / the
-- smallest per-image weight * $min_multiply, rounded to 2 decimals (half to even, as numpy),
-- then clipped at $max_multiply.
with recursive folders as (
    select path, sum(n_images)::bigint as n_images from group_counts group by path
),
prefixes as (
    select parts, unnest(range(0, len(parts) + 1)) as depth
    from (select case when path = '' then []::varchar[] else string_split(path, '/') end as parts from folders)
),
nodes as (
    select distinct
        array_to_string(list_slice(parts, 1, depth), '/') as path,
        case when depth > 0 then array_to_string(list_slice(parts, 1, depth - 1), '/') end as parent,
        case when depth > 0 then parts[depth] else '' end as name
    from prefixes
),
name_weights as (
    select n.path, arg_max(w.weight, w.ord) as weight
    from nodes n join balance_weights w on w.pattern = n.name
    group by n.path
),
pattern_weights as (
    select n.path, arg_min(w.weight, w.ord) as weight
    from nodes n join balance_weights w on n.path glob w.pattern
    group by n.path
),
weighted_nodes as (
    select n.path, n.parent, coalesce(nw.weight, pw.weight, 1.0)::double as weight, coalesce(f.n_images, 0) as own_images
    from nodes n
    left join name_weights nw on nw.path = n.path
    left join pattern_weights pw on pw.path = n.path
    left join folders f on f.path = n.path
),
denominators as (
    select p.path,
           coalesce(sum(c.weight), 0) + case when p.own_images > 0 then p.weight else 0 end as denominator
    from weighted_nodes p
    left join weighted_nodes c on c.parent = p.path
    group by p.path, p.weight, p.own_images
),
tree(path, probability) as (
    select '', 1.0::double
    union all
    select c.path, t.probability * c.weight / d.denominator
    from tree t
    join weighted_nodes c on c.parent = t.path
    join denominators d on d.path = t.path
),
folder_probabilities as (
    select n.path, n.own_images as n_images, t.probability * n.weight / d.denominator as probability
    from weighted_nodes n
    join tree t on t.path = n.path
    join denominators d on d.path = n.path
    where n.own_images > 0
),
per_image as (
    select *, probability / n_images as image_weight from folder_probabilities
)
select path, n_images, probability, image_weight,
       least(round_even(image_weight / min(image_weight) over () * $min_multiply, 2), $max_multiply) as multiply
from per_image
