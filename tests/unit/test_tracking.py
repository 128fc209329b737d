"""The object tracker without models or ROS: optimal assignment, states, occlusions, bounded memory, labels
that do not flicker, relabelling on a vocabulary change; and tracked objects through the pipeline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg_ros.core.dense import PreparedVocabulary
from ovseg_ros.core.instances import Instance
from ovseg_ros.core.tracking import CONFIRMED, LOST, TENTATIVE, Tracker, TrackerConfig, box_iou
from ovseg_ros.core.vocabulary import Vocabulary

SHAPE = (120, 160)
DIM = 8


def instance(x: float, y: float, embedding: torch.Tensor, probs: torch.Tensor, size: float = 12) -> Instance:
    mask = np.zeros(SHAPE, bool)
    mask[int(y):int(y + size), int(x):int(x + size)] = True
    return Instance(mask, np.array([x, y, x + size, y + size], np.float32), int(probs.argmax()), 0.9,
                    F.normalize(embedding.float(), dim=0), probs.float())


def one_hot(index: int, classes: int = 4, strength: float = 0.9) -> torch.Tensor:
    probs = torch.full((classes,), (1 - strength) / (classes - 1))
    probs[index] = strength
    return probs


def basis(index: int) -> torch.Tensor:
    return torch.eye(DIM)[index]


def test_assignment_is_optimal_not_first_come():
    rng = np.random.default_rng(0)
    for trial in range(40):
        tracker = Tracker(TrackerConfig(min_hits=1, min_similarity=-1.0, max_cost=10.0))
        # Close together (every pair within reach), so the choice is the assignment's alone.
        tracks = [instance(*rng.uniform(40, 47, 2), torch.from_numpy(rng.normal(size=DIM)), one_hot(i % 4))
                  for i in range(4)]
        tracker.update(tracks)
        new = [instance(*(t.box[:2] + rng.uniform(-2, 2, 2)), torch.from_numpy(rng.normal(size=DIM)),
                        one_hot(int(rng.integers(4)))) for t in tracks]
        cfg = tracker.config
        predicted = np.stack([t.predicted_box() for t in tracker.tracks])
        sim = (torch.stack([t.embedding for t in tracker.tracks]) @ torch.stack([i.embedding for i in new]).T).numpy()
        labels = np.array([[float(t.label_id == i.class_id) for i in new] for t in tracker.tracks])
        cost = cfg.iou_weight * (1 - box_iou(predicted, np.stack([i.box for i in new]))) + \
            cfg.embedding_weight * (1 - sim) + cfg.label_weight * (1 - labels)
        matches, _ = tracker._associate(new)
        best = min(sum(cost[r, c] for r, c in enumerate(perm)) for perm in itertools.permutations(range(4)))
        assert len(matches) == 4, trial
        assert sum(cost[r, c] for r, c in matches) == pytest.approx(best, abs=1e-9), trial


def test_a_pair_that_may_not_match_does_not_make_two_others_swap():
    """Track A and its object barely moved (cheap); a new object C beside A looks somewhat like A and like
    nothing of the lost-looking track B. Matching A-A and leaving C new is right; a solver that avoids a
    forbidden pair at any price would pair A-C and B-A (both allowed, dearer) and swap the ids."""
    e1, e2, e3 = (torch.tensor(v) for v in ((1.0, 0, 0, 0, 0, 0, 0, 0), (0.6, 0.8, 0, 0, 0, 0, 0, 0),
                                            (0.6, -0.8, 0, 0, 0, 0, 0, 0)))
    tracker = Tracker(TrackerConfig(min_hits=1))
    a, b = tracker.update([instance(40, 40, e1, one_hot(0)), instance(50, 40, e2, one_hot(0))])
    tracker.update([instance(40, 40, e1, one_hot(0)), instance(42, 40, e3, one_hot(0))])
    by_id = {t.id: t for t in tracker.tracks}
    assert by_id[a.id].visible and np.array_equal(by_id[a.id].box, [40, 40, 52, 52])
    assert by_id[b.id].state == LOST  # B's only candidate, C, is too unlike it
    assert len(tracker.tracks) == 3  # C is a new track


def test_states_tentative_confirmed_lost_removed():
    tracker = Tracker(TrackerConfig(min_hits=2, max_lost=3))
    obj = instance(10, 10, basis(0), one_hot(0))
    assert tracker.update([obj]) == [] and tracker.tracks[0].state == TENTATIVE
    published = tracker.update([obj])
    assert [t.state for t in published] == [CONFIRMED]
    track_id = published[0].id
    for _ in range(3):
        assert tracker.update([]) == [] and tracker.tracks[0].state == LOST
    tracker.update([])
    assert tracker.tracks == []  # lost for more than max_lost frames
    noise = instance(50, 50, basis(1), one_hot(1))
    tracker.update([noise])
    tracker.update([])
    assert tracker.tracks == []  # a tentative track that misses a frame is noise
    assert track_id == 1


def test_an_id_survives_an_occlusion_of_ten_frames_while_another_object_moves():
    tracker = Tracker(TrackerConfig(min_hits=2, max_lost=15))
    ids = []
    for t in range(30):
        objects = [instance(20 + 2 * t, 40, basis(1), one_hot(1))]  # always visible, moving right
        if not 10 <= t < 20:  # hidden for ten frames, then back where it was
            objects.append(instance(100, 60, basis(0), one_hot(0)))
        published = tracker.update(objects)
        ids.append({t.label_id: t.id for t in published})
    before, after = ids[9][0], ids[25][0]
    assert before == after
    assert len({frame[1] for frame in ids[2:]}) == 1  # the moving object kept its id throughout


def test_labels_accumulate_evidence_and_do_not_flicker():
    tracker = Tracker(TrackerConfig(min_hits=1))
    labels = []
    for t in range(12):
        probs = one_hot(0, strength=0.6) if t % 4 != 3 else one_hot(2, strength=0.95)  # one odd frame in four
        labels.append(tracker.update([instance(30, 30, basis(0), probs)])[0].label_id)
    assert labels == [0] * 12
    for _ in range(10):  # the object really is class 2 now: the label follows
        label = tracker.update([instance(30, 30, basis(0), one_hot(2))])[0].label_id
    assert label == 2


def test_memory_is_bounded_and_ids_stay_in_the_mono16_range():
    tracker = Tracker(TrackerConfig(min_hits=1, max_tracks=20, max_lost=1000))
    rng = np.random.default_rng(1)
    for _ in range(60):  # 10 new, unrelated objects every frame
        tracker.update([instance(*rng.uniform(0, 140, 2), torch.from_numpy(rng.normal(size=DIM)), one_hot(0))
                        for _ in range(10)])
        assert len(tracker.tracks) <= 20
    tracker._next_id = 65534
    tracker.update([instance(5, 5, basis(3), one_hot(3)) for _ in range(1)] +
                   [instance(100, 90, basis(4), one_hot(1))])
    assert all(1 <= t.id <= 65535 for t in tracker.tracks)


def test_a_vocabulary_change_relabels_from_the_tracks_embeddings():
    tracker = Tracker(TrackerConfig(min_hits=1))
    red, blue = basis(0), basis(1)
    tracker.update([instance(10, 10, red, one_hot(0)), instance(80, 60, blue, one_hot(1))])
    # New vocabulary: blue first, red second (and a third class).
    prepared = PreparedVocabulary(Vocabulary(("blue", "red", "green"), version=7),
                                  torch.stack([blue, red, basis(2)]))
    tracker.sync_vocabulary(prepared, logit_scale=50.0)
    assert tracker.vocabulary_version == 7
    by_box = {int(t.box[0]): t for t in tracker.tracks}
    assert by_box[10].label_id == 1 and by_box[80].label_id == 0
    assert by_box[10].evidence.shape == (3,)


def test_example_labels_name_existing_classes_as_the_vocabulary_does():
    from ovseg_ros.core.vocabulary import Exemplar, VocabularyError, with_exemplars

    vocabulary = Vocabulary(("sky", "sofa;couch"))
    example = (0.0, 1.0)
    out = with_exemplars(vocabulary, [Exemplar("Couch", example, "m"), Exemplar(" my  mug ; cup ", example, "m")])
    assert out.labels == ("sky", "sofa;couch", "my  mug;cup")  # a synonym names its class; a new name is added
    assert [e.label for e in out.exemplars] == ["sofa;couch", "my  mug;cup"]
    with pytest.raises(VocabularyError):
        with_exemplars(vocabulary, [Exemplar("", example, "m")])


def test_empty_and_background_masks_are_not_objects():
    from ovseg_ros.core.instances import object_masks

    background = np.zeros(SHAPE, bool)
    background[:, :40] = True
    empty = np.zeros(SHAPE, bool)
    on_background = np.zeros(SHAPE, bool)
    on_background[10:30, 0:30] = True
    part, whole = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    whole[40:80, 60:100] = True
    part[50:60, 70:80] = True
    kept = object_masks([empty, on_background, part, whole], background, 0.0, 0.5)
    assert len(kept) == 1 and kept[0] is whole  # the part inside a larger kept mask is not another object


def test_touching_objects_of_different_classes_are_two_instances_and_rim_specks_stay_with_theirs():
    from ovseg_ros.core.instances import split_region

    labels = np.zeros((40, 60), np.uint16)
    labels[10:30, 10:30] = 1  # an object of class 1 ...
    labels[10:30, 30:50] = 2  # ... touching one of class 2
    labels[10:12, 22:25] = 3  # a speck of a third label on the first object's rim
    region = np.zeros(labels.shape, bool)
    region[10:30, 10:50] = True
    parts = split_region(region, labels, min_part=20)
    assert len(parts) == 2 and sum(int(p.sum()) for p in parts) == int(region.sum())
    first = next(p for p in parts if p[20, 15])
    assert first[10:30, 10:30].all() and not first[:, 30:].any()  # the speck joined the object it sits on
    assert split_region(region & (labels != 2), labels, min_part=20)[0].sum() == 400  # one run: stays whole


def test_tracks_keep_their_masks_at_one_bit_per_pixel():
    from ovseg_ros.core.tracking import PackedMask

    mask = np.random.default_rng(0).random((37, 53)) > 0.5  # sizes that are not multiples of 8
    packed = PackedMask.of(mask)
    assert np.array_equal(packed.unpack(), mask) and packed.unpack().dtype == bool
    assert packed.bits.nbytes == (37 * 53 + 7) // 8
    tracker = Tracker(TrackerConfig(min_hits=1))
    track = tracker.update([instance(10, 10, basis(0), one_hot(0))])[0]
    assert track.mask[10:22, 10:22].all() and track.mask.sum() == 144
    assert track.packed_mask.bits.nbytes == 144 // 8  # only the object's box is kept


def box_instance(box: tuple[int, int, int, int], embedding: torch.Tensor, probs: torch.Tensor) -> Instance:
    """An instance whose mask is the box (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = box
    mask = np.zeros(SHAPE, bool)
    mask[y1:y2, x1:x2] = True
    return Instance(mask, np.array(box, np.float32), int(probs.argmax()), 0.9, F.normalize(embedding.float(), dim=0),
                    probs.float())


def test_objects_of_one_class_that_come_to_touch_stay_two_and_an_occluder_is_not_carved_up():
    from ovseg_ros.core.instances import separate_known

    tracker = Tracker(TrackerConfig(min_hits=1))
    for t in range(4):  # two class-1 squares moving towards each other, 4 px per frame each
        tracker.update([box_instance((20 + 4 * t, 40, 40 + 4 * t, 60), basis(0), one_hot(1)),
                        box_instance((70 - 4 * t, 40, 90 - 4 * t, 60), basis(1), one_hot(1))])
    left, right = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    left[40:60, 36:56], right[40:60, 54:74] = True, True  # next frame: they overlap by 2 px, one region of class 1
    labels = np.zeros(SHAPE, np.uint16)
    labels[left | right] = 1
    parts = separate_known([left | right], labels, tracker.expected_masks(), min_area=20)
    assert len(parts) == 2
    for truth in (left, right):
        best = max(parts, key=lambda p: (p & truth).sum())
        assert (best & truth).sum() / (best | truth).sum() > 0.85
    assert len(separate_known([left | right], labels, [], min_area=20)) == 1  # first seen touching: merged

    # A class-2 square stands still; a class-1 disc-like square slides over it and hides it wholly.
    tracker = Tracker(TrackerConfig(min_hits=1))
    for t in range(6):
        tracker.update([box_instance((60, 40, 80, 60), basis(2), one_hot(2)),
                        box_instance((12 + 4 * t, 30, 52 + 4 * t, 70), basis(3), one_hot(1))])
    occluder = np.zeros(SHAPE, bool)
    occluder[30:70, 40:80] = True  # covers the class-2 square; all of it labelled as the occluder's class
    labels = np.where(occluder, 1, 0).astype(np.uint16)
    assert len(separate_known([occluder], labels, tracker.expected_masks(), min_area=20)) == 1

    # An older occluder slides over a small still object: the occluder's seed covers the object's, so the
    # object's part would be empty; the region stays whole (no error).
    tracker = Tracker(TrackerConfig(min_hits=1))
    tracker.update([box_instance((-10, 30, 30, 70), basis(3), one_hot(1))])
    for t in range(1, 5):
        tracker.update([box_instance((-10 + 10 * t, 30, 30 + 10 * t, 70), basis(3), one_hot(1)),
                        box_instance((60, 45, 68, 55), basis(2), one_hot(2))])
    region = np.zeros(SHAPE, bool)
    region[30:70, 30:70] = True
    labels = np.where(region, 1, 0).astype(np.uint16)
    assert len(separate_known([region], labels, tracker.expected_masks(), min_area=20)) == 1


def test_an_object_coming_back_from_behind_another_keeps_its_id_though_another_part_shows_first():
    tracker = Tracker(TrackerConfig(min_hits=2, max_lost=15))
    look, probs = basis(0), one_hot(0)
    for _ in range(3):
        whole = tracker.update([box_instance((60, 40, 90, 70), look, probs)])
    track_id = whole[0].id
    tracker.update([box_instance((75, 40, 90, 70), look, probs)])  # the left half is being covered ...
    for _ in range(6):
        tracker.update([])  # ... then all of it
    # It comes back from the left: the left third shows first, a box that does not overlap the right half last
    # seen, and too little of it to look much like the object (or be labelled as it). Inside where the whole
    # object was, it is the same object.
    part = F.normalize(basis(0) + 1.1 * basis(5), dim=0)  # cosine 0.67 with the object's look
    back = tracker.update([box_instance((60, 40, 70, 70), part, one_hot(1))])
    assert len(tracker.tracks) == 1 and tracker.tracks[0].id == track_id and tracker.tracks[0].visible
    assert [t.id for t in back] == [track_id]


def test_another_object_standing_inside_where_a_lost_one_was_does_not_take_its_id():
    tracker = Tracker(TrackerConfig(min_hits=2, max_lost=15))
    for _ in range(5):
        seen = tracker.update([box_instance((20, 20, 100, 100), basis(0), one_hot(0))])
    track_id = seen[0].id
    tracker.update([])
    # Something else, somewhat alike (cosine 0.64) and labelled otherwise, in the middle of the old box: not a
    # part of the lost object coming back (that shows at its rim first).
    other = F.normalize(basis(0) + 1.2 * basis(1), dim=0)
    for _ in range(2):
        seen = tracker.update([box_instance((54, 54, 66, 66), other, one_hot(1))])
    assert [t.id for t in seen] != [track_id]
    assert any(t.id == track_id and t.state == LOST for t in tracker.tracks)


def test_the_rim_of_a_tall_box_is_measured_on_each_side_by_that_sides_length():
    from ovseg_ros.core.tracking import box_at_border

    tall = np.array([[20, 20, 60, 120]], np.float32)  # a standing person or a bottle: 40 wide, 100 high
    parts = np.array([[36, 60, 44, 70],  # in the middle: 16 px from the sides, 40 px from top and bottom
                      [21, 60, 30, 70],  # at the left side
                      [36, 110, 44, 119],  # at the bottom
                      [10, 60, 30, 70]], np.float32)  # reaching past the left side
    assert box_at_border(tall, parts, 0.2).tolist() == [[False, True, True, True]]


def test_a_track_that_began_as_two_merged_objects_is_not_looked_for_where_the_other_one_was():
    tracker = Tracker(TrackerConfig(min_hits=2, max_lost=15))
    look, probs = basis(0), one_hot(0)
    for _ in range(4):  # a small object of class 0 touching a large one that the label map also calls class 0
        merged = tracker.update([box_instance((10, 40, 130, 70), look, probs)])
    track_id = merged[0].id
    # They part: the large one (another look and class) moves off to the left and out of the frame; the track
    # goes on with the small one, which is then hidden where it stands.
    other, other_probs = basis(1), one_hot(1)
    for box in ((10, 40, 90, 70), (0, 40, 60, 70)):
        seen = tracker.update([box_instance((100, 40, 130, 70), look, probs), box_instance(box, other, other_probs)])
        assert track_id in [t.id for t in seen]
    tracker.update([box_instance((0, 40, 30, 70), other, other_probs)])
    # An object that looks just like the hidden one comes into view where the merged region was, far from it:
    # it is another object, not the hidden one coming back.
    for _ in range(3):
        seen = tracker.update([box_instance((15, 40, 45, 70), look, probs)])
    assert track_id not in [t.id for t in seen]
    back = tracker.update([box_instance((15, 40, 45, 70), look, probs), box_instance((100, 40, 130, 70), look, probs)])
    assert track_id in [t.id for t in back]
    assert next(t for t in back if t.id == track_id).box.tolist() == [100, 40, 130, 70]


def test_a_new_track_started_by_a_returning_part_hands_over_to_the_lost_track():
    tracker = Tracker(TrackerConfig(min_hits=2, max_lost=15))
    look = basis(0)
    for _ in range(3):
        seen = tracker.update([box_instance((60, 40, 90, 70), look, one_hot(0))])
    track_id = seen[0].id
    for _ in range(5):
        tracker.update([])
    # The first part to show looks unlike the object (too little of it): a new tentative track starts.
    odd = F.normalize(basis(0) * 0.3 + basis(5), dim=0)
    assert tracker.update([box_instance((60, 40, 66, 70), odd, one_hot(1))]) == []
    assert len(tracker.tracks) == 2
    # Next frame a little more shows: the tentative track fits it best, but the lost one can take it and does.
    back = tracker.update([box_instance((60, 40, 68, 70), F.normalize(0.6 * look + basis(5), dim=0), one_hot(1))])
    assert [t.id for t in back] == [track_id]
    assert len(tracker.tracks) == 1  # the tentative track, unmatched, ended


def test_what_a_track_learned_is_not_forgotten_while_it_is_hidden():
    tracker = Tracker(TrackerConfig(min_hits=1, max_lost=30))
    for _ in range(10):
        tracker.update([box_instance((60, 40, 90, 70), basis(0), one_hot(0))])
    for _ in range(20):
        tracker.update([])
    # Back, but the first views say class 1 a little (a part of it shows): the label holds.
    for _ in range(2):
        label = tracker.update([box_instance((60, 40, 90, 70), basis(0), one_hot(1, strength=0.6))])[0].label_id
    assert label == 0


def test_background_classes_are_never_objects_whatever_their_size():
    from ovseg_ros.core.dense import SegmentationResult
    from ovseg_ros.core.instances import background_mask, region_masks
    from ovseg_ros.core.vocabulary import classes_named

    vocabulary = Vocabulary(("grass;lawn", "Floor", "red mug", "table"))
    assert classes_named(vocabulary, ("LAWN", "floor", "sky")) == {0, 1}
    assert classes_named(vocabulary, "floor, table") == {1, 3}  # one comma-separated string, as a parameter
    labels = np.full(SHAPE, 1, np.uint16)  # floor everywhere ...
    labels[10:30, 10:30] = 0  # ... a small patch of grass
    labels[50:70, 50:70] = 2  # a mug
    result = SegmentationResult(labels, np.ones(SHAPE, np.float32), [0, 1, 2], ["grass", "Floor", "red mug"],
                                [1.0] * 3, [0.0] * 3, 1)
    background = background_mask(result, 0.25, classes_named(vocabulary, ("grass", "floor")))
    masks = region_masks(labels, background, min_area=20)
    assert len(masks) == 1 and masks[0][50:70, 50:70].all() and masks[0].sum() == 400
    patch = region_masks(labels, background_mask(result, 0.25), min_area=20)  # nothing named: size decides
    assert len(patch) == 2


def test_background_names_are_a_string_array_or_one_string_and_anything_else_is_refused_with_a_reason():
    from ovseg_ros.core.settings import make_settings

    assert make_settings({"track_background": "sand, wall"}).track_background == "sand, wall"
    assert make_settings({"track_background": ["sand", "wall"]}).track_background == ("sand", "wall")
    assert make_settings({"track_background": []}).track_background == ()
    for bad in (5, [1, 2], ["sand", 3.0], True):
        with pytest.raises(ValueError, match="track_background must be a string array"):
            make_settings({"track_background": bad})


def test_a_frame_of_another_size_ends_the_tracks_and_their_ids_are_not_given_again():
    tracker = Tracker(TrackerConfig(min_hits=1))
    labels = np.zeros(SHAPE, np.uint16)
    tracker.sync_frame(labels, 1)
    first = tracker.update([box_instance((10, 10, 30, 30), basis(0), one_hot(0))])[0].id
    assert not tracker.sync_frame(labels, 1)  # the same size: nothing changes
    assert [t.id for t in tracker.tracks] == [first]
    assert tracker.sync_frame(np.zeros((SHAPE[0] * 2, SHAPE[1] * 2), np.uint16), 1)
    assert tracker.tracks == []
    mask = np.zeros((SHAPE[0] * 2, SHAPE[1] * 2), bool)
    mask[20:60, 20:60] = True
    again = tracker.update([Instance(mask, np.array([20, 20, 60, 60], np.float32), 0, 0.9, basis(0), one_hot(0))])
    assert again[0].id != first


def test_a_scene_cut_ends_the_tracks_and_motion_does_not():
    """A label map that changed on more than `scene_cut_share` of its samples is another scene: the tracks end
    there (a new object must not inherit a remembered name); a shift, or a new vocabulary, is no cut."""
    tracker = Tracker(TrackerConfig(min_hits=1))
    labels = np.zeros(SHAPE, np.uint16)
    labels[:, 80:] = 1
    labels[20:50, 20:50] = 2
    tracker.sync_frame(labels, 1, 0.5)
    tracker.update([box_instance((20, 20, 50, 50), basis(0), one_hot(0))])
    moved = np.roll(labels, 8, axis=1)  # the camera turned: a small part of the map changed
    assert not tracker.sync_frame(moved, 1, 0.5) and len(tracker.tracks) == 1
    relabelled = (moved + 1) % 3  # every pixel another id: a vocabulary change, not a cut
    assert not tracker.sync_frame(relabelled, 2, 0.5) and len(tracker.tracks) == 1
    other = (relabelled + 1) % 3  # every sample changed
    assert not tracker.sync_frame(other, 2, 0.0) and len(tracker.tracks) == 1  # 0: never cut
    assert tracker.sync_frame(relabelled, 2, 0.5) and tracker.tracks == []
