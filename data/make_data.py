#!/usr/bin/env python3
"""Generate loramill's bundled synthetic fine-tuning datasets.

Standard library only, deterministic (seeded).  All text below was written
by the loramill authors for this purpose; nothing is downloaded or copied.
Released under CC0-1.0 (public domain dedication).

    python data/make_data.py

writes, next to this file:

    medical/train.jsonl  medical/eval.jsonl   (chat format)
    legal/train.jsonl    legal/eval.jsonl     (instruction format)
    support/train.jsonl  support/eval.jsonl   (chat format, some multi-turn)
    */DATACARD.md                             (counts filled in from the run)

Every domain has a fixed "house style" and a fixed fact table.  Train and
eval ask about the same facts, but every eval prompt contains at least one
held-out wording (a held-out question paraphrase, question template or
instruction), so no eval prompt occurs in train.

All content is fictional or general, synthetic, and is not medical or legal
advice.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 20240611
N_TRAIN = 400
N_EVAL = 80
MAX_CHARS = 700  # total characters of all message/field text in one example

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------
# Shared helpers and fillers
# ---------------------------------------------------------------------------

NAMES = [
    "Ana", "Ben", "Chidi", "Dana", "Elif", "Farah", "Gus", "Hana", "Ivan",
    "Jade", "Kofi", "Lena", "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa",
    "Sami", "Tess", "Uma", "Victor", "Wen", "Xavi", "Yara", "Zoe", "Arjun",
    "Bea", "Cole", "Dmitri", "Esme", "Felix", "Gita", "Hugo", "Ines", "Jonas",
    "Kira", "Luca", "Mina", "Noor",
]


def lc_first(s: str) -> str:
    """Lower-case the first letter unless it is the pronoun I (I, I'm, I've)."""
    if s.startswith(("I ", "I'", "Lumen", "LCB", "Ardenia")):
        return s
    return s[:1].lower() + s[1:]


def fill(template: str, **kw: str) -> str:
    out = template.format(**kw)
    return out[:1].upper() + out[1:]


def split_pool(items: list, n_held: int) -> tuple[list, list]:
    """Last n_held items are eval-only; the rest are train-only."""
    return items[:-n_held], items[-n_held:]


# ---------------------------------------------------------------------------
# Medical (chat format)
# ---------------------------------------------------------------------------

MED_SYSTEM = "You are a friendly health information assistant. Give general guidance only."
MED_CLOSING = ("This is general information, not a diagnosis. "
               "See a clinician if symptoms persist or worsen.")

# Each topic: situations (first-person statements, no final punctuation; the
# LAST one is eval-only), optional {ctx} fillers, a summary line, bullets.
MED_TOPICS = [
    dict(
        key="sprain",
        ctx=["while jogging", "on the stairs", "playing basketball",
             "stepping off a curb", "on a hike", "at football practice"],
        situations=[
            "I rolled my ankle {ctx} and it is a bit swollen",
            "I twisted my ankle {ctx} and it hurts to walk on",
            "I think I sprained my wrist {ctx}",
            "my knee feels strained and puffy after a fall {ctx}",
            "I turned my ankle {ctx} and now it is sore and tender",
        ],
        summary="A mild sprain usually settles with RICE: rest, ice, compression and elevation.",
        bullets=[
            "Rest the joint and avoid movements that cause pain.",
            "Apply a cold pack wrapped in a cloth for 15-20 minutes a few times a day.",
            "Use a snug, not tight, elastic bandage for support.",
            "Keep it raised above heart level when you can.",
            "Get it checked if you cannot bear weight or it looks misshapen.",
        ],
    ),
    dict(
        key="dehydration",
        ctx=["after working outside", "after a long run", "on a hot day",
             "after gardening all afternoon", "after a summer bike ride"],
        situations=[
            "I feel very thirsty and a little lightheaded {ctx}",
            "my mouth is dry and I have a mild headache {ctx}",
            "I think I am dehydrated {ctx}",
            "my pee is dark yellow and I feel tired {ctx}",
            "I barely drank anything {ctx} and now I feel drained",
        ],
        summary="Mild dehydration usually improves by sipping fluids steadily and resting somewhere cool.",
        bullets=[
            "Sip water or an oral rehydration drink rather than gulping.",
            "Rest in the shade or a cool room until you feel better.",
            "Pale yellow urine is a good sign you are catching up.",
            "Seek care quickly for confusion, fainting or no urine for 8 hours.",
        ],
    ),
    dict(
        key="sleep",
        ctx=["most nights", "since starting a new job", "lately",
             "during exam season", "for the past two weeks"],
        situations=[
            "I can't fall asleep at night {ctx}",
            "I lie awake for hours {ctx}",
            "I keep waking up tired {ctx}",
            "my sleep has been poor {ctx}",
            "I toss and turn in bed {ctx}",
        ],
        summary="Steady sleep habits help most people fall asleep more easily.",
        bullets=[
            "Get up at the same time every day, weekends included.",
            "Avoid caffeine after early afternoon.",
            "Keep the bedroom dark, quiet and cool.",
            "Put screens away 30-60 minutes before bed.",
            "If you are awake for 20 minutes, get up and do something calm.",
        ],
    ),
    dict(
        key="cut",
        ctx=["while cooking", "on a sheet of paper", "opening a package",
             "while slicing bread", "on a garden tool"],
        situations=[
            "I got a small cut on my finger {ctx}",
            "I nicked my hand {ctx} and it is bleeding a little",
            "I have a shallow cut {ctx}",
            "I sliced my thumb {ctx}",
            "I scratched my palm {ctx} and it won't stop oozing",
        ],
        summary="A small, shallow cut can usually be cleaned and covered at home.",
        bullets=[
            "Rinse it under clean running water.",
            "Press with a clean cloth for about 10 minutes to stop bleeding.",
            "Cover with a clean bandage and change it daily.",
            "Get care if it is deep, gaping or still bleeding after 10 minutes of pressure.",
        ],
    ),
    dict(
        key="burn",
        ctx=["on a hot pan", "from the oven door", "with boiling water",
             "on a curling iron", "from a kettle"],
        situations=[
            "I burned my hand {ctx}",
            "I got a small burn on my arm {ctx}",
            "my finger is red and stinging after a burn {ctx}",
            "I touched something hot and burned my wrist {ctx}",
            "I scalded the back of my hand {ctx}",
        ],
        summary="For a small burn, cool it quickly with running water and keep it clean.",
        bullets=[
            "Hold it under cool, not icy, running water for 20 minutes.",
            "Remove rings or tight items near the area before it swells.",
            "Cover loosely with a clean, non-fluffy dressing.",
            "Do not put butter, ice or toothpaste on a burn.",
            "Get care if it is larger than your palm or on the face, hands or joints.",
        ],
    ),
    dict(
        key="nosebleed",
        ctx=["this morning", "out of nowhere", "after blowing my nose",
             "in the dry weather", "at work"],
        situations=[
            "I have a nosebleed {ctx}",
            "my nose started bleeding {ctx}",
            "I keep getting nosebleeds {ctx}",
            "blood is dripping from one nostril {ctx}",
            "my nose began to bleed {ctx} and I'm not sure how to stop it",
        ],
        summary="Most nosebleeds stop with steady pressure while leaning forward.",
        bullets=[
            "Sit up and lean slightly forward, not back.",
            "Pinch the soft part of your nose for 10-15 minutes without letting go.",
            "Breathe through your mouth and spit out any blood.",
            "Seek care if it lasts over 20 minutes or follows a head injury.",
        ],
    ),
    dict(
        key="cold",
        ctx=["since Monday", "for three days", "after a busy week",
             "this week", "since the weekend"],
        situations=[
            "I have a runny nose and a sore throat {ctx}",
            "I think I caught a cold {ctx}",
            "I'm sneezing and stuffy {ctx}",
            "I have a scratchy throat and a cough {ctx}",
            "I've felt sniffly and run down {ctx}",
        ],
        summary="A common cold usually clears up on its own within about a week to ten days.",
        bullets=[
            "Rest and drink plenty of fluids.",
            "Warm drinks with honey can soothe a sore throat (not for babies under 1).",
            "If you use a cold remedy, follow the label.",
            "See a clinician if it lasts over 10 days or you struggle to breathe.",
        ],
    ),
    dict(
        key="fever",
        ctx=["since last night", "today", "after feeling achy",
             "for about a day", "this afternoon"],
        situations=[
            "I have a mild fever {ctx}",
            "my temperature is a bit high {ctx}",
            "I feel hot and shivery {ctx}",
            "I'm running a low fever {ctx}",
            "I've had a slight temperature {ctx} and feel weak",
        ],
        summary="A mild fever in an adult is often the body fighting an infection and can be eased at home.",
        bullets=[
            "Rest and drink extra fluids.",
            "Wear light clothing and keep the room comfortably cool.",
            "If you take a fever reducer, follow the label.",
            "Seek care for a fever over 3 days, a stiff neck, confusion or a rash.",
        ],
    ),
    dict(
        key="sunburn",
        ctx=["at the beach", "after a picnic", "at an outdoor concert",
             "after a day on the lake", "while hiking"],
        situations=[
            "I got sunburned {ctx}",
            "my shoulders are red and sore from the sun {ctx}",
            "I have a sunburn {ctx}",
            "my skin is pink and hot after too much sun {ctx}",
            "I forgot sunscreen {ctx} and now my face is burning",
        ],
        summary="Mild sunburn usually heals in a few days with cooling and moisture.",
        bullets=[
            "Take a cool shower or use cool, damp cloths.",
            "Apply a gentle moisturizer or aloe gel.",
            "Drink extra water and stay out of the sun while it heals.",
            "Do not pop blisters; seek care for widespread blisters, fever or chills.",
        ],
    ),
    dict(
        key="headache",
        ctx=["after a long day at the computer", "most afternoons",
             "after a stressful meeting", "by the end of the workday",
             "after studying"],
        situations=[
            "I get a dull, tight headache {ctx}",
            "my forehead feels like it's in a band {ctx}",
            "I have a tension headache {ctx}",
            "my head aches and my neck feels stiff {ctx}",
            "a pressure headache creeps in {ctx}",
        ],
        summary="Tension-type headaches often ease with rest, water and a break from screens.",
        bullets=[
            "Drink a glass of water and have a snack if you skipped a meal.",
            "Take a short break from screens and stretch your neck and shoulders.",
            "If you use a pain reliever, follow the label.",
            "Get urgent care for a sudden severe headache, weakness or vision changes.",
        ],
    ),
    dict(
        key="heat",
        ctx=["at a festival", "while mowing the lawn", "during a heat wave",
             "at a summer game", "on a building site"],
        situations=[
            "I feel faint, sweaty and sick in the heat {ctx}",
            "I think I have heat exhaustion {ctx}",
            "I got dizzy and clammy in the hot sun {ctx}",
            "I'm overheated and nauseous {ctx}",
            "I feel weak and drenched in sweat from the heat {ctx}",
        ],
        summary="Heat exhaustion needs cooling down right away.",
        bullets=[
            "Move to a cool or shaded place and lie down.",
            "Loosen tight clothing and sip cool water.",
            "Put cool, damp cloths on your skin.",
            "Call emergency services for confusion, fainting or hot, dry skin.",
        ],
    ),
    dict(
        key="sting",
        ctx=["in the garden", "at a picnic", "on my walk", "by the pool",
             "while picking fruit"],
        situations=[
            "I got stung by a bee {ctx}",
            "a wasp stung my arm {ctx}",
            "I have a bee sting on my hand {ctx}",
            "something stung my ankle {ctx} and it's swelling a little",
            "a bee got me on the neck {ctx}",
        ],
        summary="Most bee or wasp stings cause local pain and swelling that fade within a day or two.",
        bullets=[
            "Scrape out any stinger sideways with a card edge.",
            "Wash the area with soap and water.",
            "Apply a cold pack for 10 minutes to ease swelling.",
            "Call emergency services for trouble breathing or a swollen face or throat.",
        ],
    ),
    dict(
        key="blister",
        ctx=["from new shoes", "after a long walk", "from hiking boots",
             "after a dance class", "from running"],
        situations=[
            "I have a blister on my heel {ctx}",
            "my toe got a blister {ctx}",
            "I have a sore blister {ctx}",
            "a fluid bubble formed on my foot {ctx}",
            "my heel rubbed raw and blistered {ctx}",
        ],
        summary="Blisters heal best when the skin on top is left in place.",
        bullets=[
            "Do not pop it; cover it with a padded dressing.",
            "If it bursts, wash gently and cover with a clean bandage.",
            "Switch to footwear that does not rub until it heals.",
            "See a clinician if it turns red, warm or has pus.",
        ],
    ),
    dict(
        key="motion",
        ctx=["on long car trips", "on boats", "on the bus", "on ferries",
             "in the back seat"],
        situations=[
            "I get carsick {ctx}",
            "I feel queasy {ctx}",
            "motion sickness hits me {ctx}",
            "I get nauseous and dizzy {ctx}",
            "my stomach turns {ctx}",
        ],
        summary="Motion sickness can often be reduced by keeping your eyes and body in agreement.",
        bullets=[
            "Sit where motion is smallest, like the front seat, and look at the horizon.",
            "Avoid reading or screens while moving.",
            "Get fresh air and eat small, light snacks.",
            "If you use a travel-sickness remedy, follow the label.",
        ],
    ),
    dict(
        key="allergies",
        ctx=["every spring", "when the grass is cut", "on windy days",
             "in pollen season", "this month"],
        situations=[
            "I have itchy eyes and sneezing {ctx}",
            "my hay fever flares up {ctx}",
            "my nose runs and my eyes water {ctx}",
            "seasonal allergies bother me {ctx}",
            "pollen makes me miserable {ctx}",
        ],
        summary="Seasonal allergy symptoms improve by limiting pollen exposure.",
        bullets=[
            "Keep windows closed on high pollen days.",
            "Shower and change clothes after time outdoors.",
            "A saline nasal rinse can help clear pollen.",
            "If you use an antihistamine, follow the label; see a clinician if you wheeze.",
        ],
    ),
    dict(
        key="back",
        ctx=["after moving boxes", "after lifting a suitcase",
             "after yard work", "after carrying groceries",
             "after helping a friend move"],
        situations=[
            "my lower back hurts {ctx}",
            "I strained my back {ctx}",
            "I have a sore, stiff back {ctx}",
            "my back twinges when I bend {ctx}",
            "I tweaked my lower back {ctx}",
        ],
        summary="Most simple back strains improve within a few weeks if you keep gently moving.",
        bullets=[
            "Stay gently active; long bed rest usually slows recovery.",
            "Try a warm pack after the first day.",
            "When lifting later, bend your knees and keep the load close.",
            "Get urgent care for leg weakness, numbness or bladder changes.",
        ],
    ),
    dict(
        key="eyestrain",
        ctx=["after hours on my laptop", "at the end of the workday",
             "after gaming", "from reading on my phone", "after long shifts at a screen"],
        situations=[
            "my eyes feel tired and dry {ctx}",
            "I have eye strain {ctx}",
            "my eyes burn {ctx}",
            "my vision feels a little fuzzy {ctx}",
            "my eyes ache and feel gritty {ctx}",
        ],
        summary="Screen-related eye strain usually eases with regular breaks.",
        bullets=[
            "Every 20 minutes, look at something 20 feet away for 20 seconds.",
            "Keep the screen about an arm's length away and slightly below eye level.",
            "Blink often and reduce glare from windows or lamps.",
            "See an eye care professional if blurred vision persists.",
        ],
    ),
    dict(
        key="stress",
        ctx=["before exams", "at work this month", "since moving house",
             "in the evenings", "before big meetings"],
        situations=[
            "I feel stressed and tense {ctx}",
            "I can't seem to relax {ctx}",
            "my mind races and I feel on edge {ctx}",
            "I've been feeling wound up {ctx}",
            "stress is getting to me {ctx}",
        ],
        summary="Short, simple habits can take the edge off everyday stress.",
        bullets=[
            "Try slow breathing: in for 4 counts, out for 6, for a few minutes.",
            "Take a short walk outside.",
            "Limit caffeine and keep regular sleep times.",
            "Talk to someone you trust; see a clinician if it feels overwhelming.",
        ],
    ),
    dict(
        key="stomach",
        ctx=["since eating takeout last night", "after a picnic",
             "since this morning", "after a buffet", "since lunch"],
        situations=[
            "I have an upset stomach and loose stools {ctx}",
            "I think I have mild food poisoning {ctx}",
            "I've been queasy with diarrhea {ctx}",
            "my stomach is cramping and unsettled {ctx}",
            "I've had a stomach bug {ctx}",
        ],
        summary="A mild stomach upset usually passes in a day or two; the main job is staying hydrated.",
        bullets=[
            "Take small, frequent sips of water or an oral rehydration drink.",
            "Return to bland foods like toast or rice when you feel ready.",
            "Wash your hands well to avoid spreading it.",
            "Seek care for blood in stool or if you cannot keep fluids down for a day.",
        ],
    ),
    dict(
        key="splinter",
        ctx=["from a wooden fence", "from a deck chair", "while sanding",
             "from a garden bench", "from firewood"],
        situations=[
            "I got a splinter in my finger {ctx}",
            "there is a small splinter in my palm {ctx}",
            "I have a wood sliver stuck in my thumb {ctx}",
            "a splinter is stuck in my hand {ctx}",
            "I picked up a sliver {ctx}",
        ],
        summary="A small, shallow splinter can usually be removed at home.",
        bullets=[
            "Wash your hands and the area with soap and water.",
            "Use clean tweezers to pull it out in the direction it went in.",
            "Wash again and cover with a bandage.",
            "See a clinician if it is deep, under a nail or the area gets red and warm.",
        ],
    ),
    dict(
        key="chestpain",
        ctx=["while walking uphill", "out of nowhere", "at rest",
             "after climbing stairs", "this evening"],
        situations=[
            "I suddenly have pressure in my chest {ctx}",
            "I have chest pain spreading to my arm {ctx}",
            "my chest feels tight and I'm short of breath {ctx}",
            "I feel a crushing chest pain {ctx}",
            "I have sudden chest discomfort and feel sweaty {ctx}",
        ],
        summary="Sudden chest pain can be an emergency: call your local emergency number now.",
        bullets=[
            "Stop what you are doing and sit down.",
            "Do not drive yourself to hospital.",
            "Tell someone nearby and unlock the door for responders.",
        ],
    ),
    dict(
        key="hiccups",
        ctx=["after a fizzy drink", "after eating fast", "for an hour",
             "since dinner", "after laughing a lot"],
        situations=[
            "I can't stop hiccuping {ctx}",
            "I have the hiccups {ctx}",
            "my hiccups won't go away {ctx}",
            "I keep hiccuping {ctx}",
            "I've had hiccups {ctx} and they're annoying",
        ],
        summary="Hiccups are usually harmless and stop on their own.",
        bullets=[
            "Sip cold water slowly.",
            "Hold your breath for a short count, then breathe out slowly.",
            "Eat and drink more slowly next time.",
            "See a clinician if hiccups last more than 48 hours.",
        ],
    ),
]

# Question templates: {s} is the situation; the LAST 4 are eval-only.
MED_TEMPLATES = [
    "{s}. What should I do?",
    "{s}. Any tips?",
    "Hi, I'm {name}. {s}. How should I handle it?",
    "{s}. What do you recommend?",
    "Quick question: {sl}. What helps?",
    "{s}. Is there anything I can do at home?",
    "{name} here, age {age}. {s}. Advice?",
    "{s}. How do I take care of it?",
    "Hello! {s}. What's the best thing to do?",
    "{s}. Should I be worried?",
    "I'm {age} and {sl}. What now?",
    "Need advice: {sl}.",
    "{s}. What's the usual self-care?",
    "Hey, {sl}. Tips please.",
    "{s}. When should I see someone about it?",
    "Can you help? {s}.",
    "My name is {name}. {s}. What can I do?",
    "{s}. How can I feel better?",
    # eval-only
    "{s}. What would you suggest I do first?",
    "Hi there, {name} again. {s}. What's your advice?",
    "Not sure what to do: {sl}.",
    "{s}. Any home care advice for someone aged {age}?",
]


def make_medical(rng: random.Random, split: str):
    tpl_train, tpl_eval = split_pool(MED_TEMPLATES, 4)
    topic = rng.choice(MED_TOPICS)
    sit_train, sit_eval = split_pool(topic["situations"], 1)
    if split == "train":
        sit, tpl = rng.choice(sit_train), rng.choice(tpl_train)
    else:
        # held-out paraphrase, held-out template, or both
        mode = rng.randrange(3)
        sit = rng.choice(sit_eval if mode in (0, 2) else sit_train)
        tpl = rng.choice(tpl_eval if mode in (1, 2) else tpl_train)
    s = sit.format(ctx=rng.choice(topic["ctx"]))
    user = fill(tpl, s=s[:1].upper() + s[1:], sl=lc_first(s), name=rng.choice(NAMES),
                age=str(rng.randint(18, 75)))
    bullets = topic["bullets"]
    k = min(len(bullets), rng.choice([2, 3, 3, 4]))
    picked = sorted(rng.sample(range(len(bullets)), k))
    answer = "\n".join([topic["summary"]] + ["- " + bullets[i] for i in picked]
                       + ["", MED_CLOSING])
    msgs = []
    if rng.random() < 0.6:
        msgs.append({"role": "system", "content": MED_SYSTEM})
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": msgs}, user


# ---------------------------------------------------------------------------
# Legal (instruction format) -- fictional jurisdiction "Ardenia"
# ---------------------------------------------------------------------------

CITIES = ["Port Velan", "Marrowick", "Easthollow", "Tessary", "Brindle Cross",
          "Oldmere", "Sallowfield", "Kestrel Bay"]

# questions: the LAST one is eval-only.
LEGAL_FACTS = [
    dict(
        role="tenant",
        questions=[
            "How long does my landlord have to return my security deposit?",
            "When must a landlord give back a rental deposit after move-out?",
            "Is there a deadline for returning my deposit after I moved out?",
            "My landlord still has my deposit. How long are they allowed to keep it?",
            "How many days does a landlord get to refund a tenant's deposit?",
        ],
        short="21 days after you move out, with an itemized list of any deductions.",
        why=("Ardenia Civil Code § 4-112 requires the landlord to return the deposit, "
             "minus itemized deductions for damage beyond normal wear, within 21 days."),
        next="Send a dated written request citing § 4-112 and keep a copy.",
    ),
    dict(
        role="tenant",
        questions=[
            "How big a security deposit can a landlord ask for?",
            "Is there a cap on rental deposits?",
            "My landlord wants three months' rent as a deposit. Is that allowed?",
            "What is the maximum deposit for an apartment?",
            "Can a landlord demand any deposit amount they like?",
        ],
        short="No more than two months' rent.",
        why="Ardenia Civil Code § 4-110 caps a residential security deposit at two months' rent.",
        next="Point the landlord to § 4-110 in writing and ask for the excess back.",
    ),
    dict(
        role="tenant",
        questions=[
            "Can my landlord enter my flat without telling me?",
            "How much notice must a landlord give before coming in?",
            "My landlord keeps showing up unannounced. Is that legal?",
            "Does my landlord need permission to enter for an inspection?",
            "What notice is required before a landlord visits the unit?",
        ],
        short="Only with 24 hours' written notice, except in an emergency.",
        why="Ardenia Civil Code § 4-118 requires 24 hours' written notice before entry unless there is an emergency.",
        next="Ask the landlord in writing to follow § 4-118 and log any entries.",
    ),
    dict(
        role="tenant",
        questions=[
            "My heating broke. How fast must the landlord fix it?",
            "How long can a landlord leave the water or power off?",
            "What is the deadline for essential repairs in a rental?",
            "The hot water has been out for days. What are my rights?",
            "Is there a time limit for a landlord to repair the heat?",
        ],
        short="Essential services must be repaired within 7 days of written notice.",
        why="Ardenia Civil Code § 4-125 treats heat, water and power as essential and sets a 7-day repair deadline.",
        next="Give written notice now; if unfixed after 7 days, apply to the Rent Tribunal.",
    ),
    dict(
        role="tenant",
        questions=[
            "How much notice do I give to end a month-to-month lease?",
            "I rent month to month. How do I move out properly?",
            "What notice period applies to ending a monthly tenancy?",
            "How far ahead must my landlord warn me to end a monthly rental?",
            "What notice ends a rolling monthly lease?",
        ],
        short="30 days' written notice from the tenant; 60 days from the landlord.",
        why="Ardenia Civil Code § 4-140 sets the notice periods for ending a month-to-month tenancy.",
        next="Give dated written notice at least 30 days before your move-out date.",
    ),
    dict(
        role="resident",
        questions=[
            "How long do I have to sue over a broken written contract?",
            "Is there a time limit to bring a claim on a signed contract?",
            "A client breached our written agreement years ago. Is it too late to sue?",
            "What is the limitation period for written contracts?",
            "When does the deadline run out to enforce a written contract?",
        ],
        short="Six years from the breach.",
        why="Ardenia Civil Code § 3-301 sets a 6-year limitation period for written contracts.",
        next="Note the breach date and file before six years have passed.",
    ),
    dict(
        role="resident",
        questions=[
            "How long can I wait to sue over a verbal agreement?",
            "Is a handshake deal enforceable, and for how long?",
            "What is the limitation period for an oral contract?",
            "A friend broke a spoken promise to pay me. How long do I have to claim?",
            "When does the clock run out on an unwritten contract?",
        ],
        short="Three years from the breach.",
        why="Ardenia Civil Code § 3-302 sets a 3-year limitation period for oral contracts.",
        next="Write down what was agreed, gather witnesses and file within three years.",
    ),
    dict(
        role="resident",
        questions=[
            "A neighbor's dog bit me. Is the owner responsible?",
            "Is a dog owner liable if the dog never bit anyone before?",
            "Who pays when a dog bites someone?",
            "My child was bitten by a dog in the park. Can we claim?",
            "Does a dog owner have to cover bite injuries?",
        ],
        short="The owner is liable, even if the dog has no history of biting.",
        why="Ardenia Civil Code § 3-410 makes a dog's owner strictly liable for bite injuries.",
        next="Get medical care, photograph the injury and send the owner a written claim.",
    ),
    dict(
        role="resident",
        questions=[
            "What is the limit for small claims court?",
            "Can I use small claims for a 5,000 crown dispute?",
            "How much can I claim in small claims court?",
            "What does it cost to file a small claim, and up to what amount?",
            "Is my 7,500 crown claim small enough for small claims?",
        ],
        short="Claims up to 8,000 crowns, with a 50 crown filing fee.",
        why="Ardenia Civil Code § 2-205 sets the small claims limit at 8,000 crowns and the fee at 50 crowns.",
        next="File the claim form at your district court with your evidence attached.",
    ),
    dict(
        role="shopper",
        questions=[
            "Can I cancel something I bought online?",
            "How long do I have to return an online order?",
            "I changed my mind about an online purchase. Can I send it back?",
            "Is there a cooling-off period for internet shopping?",
            "What is the cancellation window for goods bought on a website?",
        ],
        short="Within 14 days of delivery; the refund is then due within 14 days.",
        why="Ardenia Consumer Code § 5-104 gives a 14-day cancellation right for online purchases.",
        next="Notify the seller in writing within 14 days of delivery and keep proof.",
    ),
    dict(
        role="shopper",
        questions=[
            "My blender broke after a year. Do I have any rights?",
            "How long must goods be free of defects?",
            "The store says the warranty ended. Can I still get a repair?",
            "What protection do I have if a product turns out faulty?",
            "Is a seller responsible for a defect after 18 months?",
        ],
        short="Goods must be free of defects for 2 years from delivery.",
        why="Ardenia Consumer Code § 5-120 entitles you to repair, replacement or refund for defects within 2 years.",
        next="Contact the seller in writing, cite § 5-120 and ask for a repair or replacement.",
    ),
    dict(
        role="shopper",
        questions=[
            "Can a gift card expire after six months?",
            "How long must a gift card stay valid?",
            "The shop refused my old gift card. Is that allowed?",
            "Do gift vouchers have a minimum validity?",
            "Is there a rule on gift card expiry dates?",
        ],
        short="Gift cards must stay valid for at least 5 years.",
        why="Ardenia Consumer Code § 5-130 sets a minimum validity of 5 years from purchase.",
        next="Show the shop § 5-130 and ask them to honor the card.",
    ),
    dict(
        role="shopper",
        questions=[
            "My subscription renewed without warning. Is that legal?",
            "Does a company have to remind me before auto-renewal?",
            "Can a service renew my plan automatically?",
            "I was charged for a renewal I forgot about. What are my rights?",
            "What notice is owed before a subscription auto-renews?",
        ],
        short="Only if they sent a reminder at least 30 days before renewal.",
        why="Ardenia Consumer Code § 5-150 requires a 30-day renewal reminder and an online way to cancel.",
        next="Ask for a refund in writing if no reminder was sent, citing § 5-150.",
    ),
    dict(
        role="employee",
        questions=[
            "When must I get my final paycheck after quitting?",
            "How soon does an employer have to pay my last wages?",
            "I left my job two weeks ago and haven't been paid. Is that allowed?",
            "What is the deadline for final pay after leaving a job?",
            "How long can my old employer hold my last pay?",
        ],
        short="Within 5 business days after your last day of work.",
        why="Ardenia Labour Code § 6-210 requires final wages within 5 business days.",
        next="Send your former employer a written demand citing § 6-210.",
    ),
    dict(
        role="employee",
        questions=[
            "Do I get paid extra for overtime?",
            "What is the overtime rate?",
            "I worked 46 hours last week. Am I owed more?",
            "After how many hours does overtime start?",
            "Must my boss pay more for hours over forty?",
        ],
        short="1.5 times your usual rate for hours over 40 in a week.",
        why="Ardenia Labour Code § 6-215 sets overtime at time and a half beyond 40 weekly hours.",
        next="Compare your timesheets with your payslip and raise any gap in writing.",
    ),
    dict(
        role="employee",
        questions=[
            "How much notice must my employer give before letting me go?",
            "Can I be dismissed without notice after three years?",
            "What notice period applies to a dismissal?",
            "I've worked here six years. How much notice am I owed?",
            "Is there a minimum notice to fire a long-serving worker?",
        ],
        short="2 weeks after 1 year of service, and 4 weeks after 5 years.",
        why="Ardenia Labour Code § 6-230 sets minimum dismissal notice by length of service.",
        next="Check your start date and ask for the full notice, or pay instead, in writing.",
    ),
    dict(
        role="employee",
        questions=[
            "How many days of paid leave am I entitled to?",
            "What is the minimum annual holiday?",
            "My contract gives 12 days off a year. Is that legal?",
            "How much vacation must a full-time job include?",
            "Is there a legal minimum for yearly paid leave?",
        ],
        short="At least 20 working days of paid leave a year for full-time work.",
        why="Ardenia Labour Code § 6-240 sets a minimum of 20 paid leave days per year.",
        next="Raise the shortfall with HR in writing and cite § 6-240.",
    ),
    dict(
        role="employee",
        questions=[
            "Can my boss punish me for serving on a jury?",
            "I was called for jury duty. Can I be fired?",
            "Does my employer have to let me attend jury service?",
            "Is it legal to dock my pay review for jury duty?",
            "Am I protected at work while on jury service?",
        ],
        short="Your employer may not dismiss or penalize you for jury service.",
        why="Ardenia Labour Code § 6-250 protects employees called for jury service.",
        next="Give your employer a copy of the summons as early as possible.",
    ),
    dict(
        role="resident",
        questions=[
            "What are the quiet hours for noise?",
            "My neighbor plays loud music at midnight. Is there a rule?",
            "When does noise become a violation at night?",
            "Can I complain about building work at 6 in the morning?",
            "Which hours count as quiet time in a residential area?",
        ],
        short="Quiet hours run from 22:00 to 07:00.",
        why="Ardenia Municipal Code § 7-040 limits loud noise in residential areas between 22:00 and 07:00.",
        next="Keep a log of dates and times and report repeat noise to the municipal office.",
    ),
]

# Wrappers around a question; {q} question, {ql} question with lower-cased
# first letter. The LAST 3 are eval-only.
LEGAL_WRAPPERS = [
    "{q}",
    "I live in {city}. {q}",
    "My name is {name}. {q}",
    "{q} I'm in {city}.",
    "Quick question about Ardenian law: {ql}",
    "Hello, {ql}",
    "{q} Thanks in advance.",
    "As {arole} in {city}, I'd like to know: {ql}",
    "I'm {arole}. {q}",
    "{name} from {city} here. {q}",
    "Under Ardenian law, {ql}",
    "{q} Please keep it brief.",
    "Legal question from {arole}: {ql}",
    "Hi, {name} here. {q}",
    "{q} (I'm {arole} in Ardenia.)",
    "Can you help? {q}",
    # eval-only
    "Good morning. I'm {name}, {arole}. {q}",
    "{q} Asking from {city}, Ardenia.",
    "Wondering about my rights as {arole}: {ql}",
]

# Instructions used when the question goes in `input`. LAST 2 eval-only.
LEGAL_INSTRUCTIONS = [
    "Answer this question about Ardenian law.",
    "Answer the legal question below using the Ardenia codes.",
    "Explain the rule that applies under Ardenian law.",
    "Give a short legal answer for Ardenia.",
    "Respond to this question about the law in Ardenia.",
    "Using Ardenian law, answer the question in the input.",
    # eval-only
    "Apply the relevant Ardenia code section to this question.",
    "Briefly answer this Ardenian legal question.",
]


def make_legal(rng: random.Random, split: str):
    w_train, w_eval = split_pool(LEGAL_WRAPPERS, 3)
    i_train, i_eval = split_pool(LEGAL_INSTRUCTIONS, 2)
    fact = rng.choice(LEGAL_FACTS)
    q_train, q_eval = split_pool(fact["questions"], 1)
    if split == "train":
        q, w, ins = rng.choice(q_train), rng.choice(w_train), rng.choice(i_train)
    else:
        mode = rng.randrange(3)
        q = rng.choice(q_eval if mode in (0, 2) else q_train)
        w = rng.choice(w_eval if mode in (1, 2) else w_train)
        ins = rng.choice(i_eval if mode in (1, 2) else i_train)
    text = fill(w, q=q, ql=lc_first(q), name=rng.choice(NAMES), city=rng.choice(CITIES),
                role=fact["role"], arole=("an " if fact["role"][0] in "aeiou" else "a ") + fact["role"])
    if rng.random() < 0.5:
        rec_in, rec_ins = "", text
    else:
        rec_in, rec_ins = text, ins
    output = f"Short answer: {fact['short']}\n\nWhy: {fact['why']}\n\nNext step: {fact['next']}"
    rec = {"instruction": rec_ins, "input": rec_in, "output": output}
    return rec, rec_ins + "\n" + rec_in


# ---------------------------------------------------------------------------
# Support (chat format, some multi-turn) -- fictional product
# ---------------------------------------------------------------------------

SUP_SYSTEM = "You are the support assistant for Lumen Cloud Backup by Halvorsen Softworks."
SUP_OPEN = "Thanks for reaching out!"
SUP_SIGN = "— Lumen Support"

# issues: questions (LAST one eval-only), lead line, numbered steps.
# Plans: Starter 50 GB / 1 device / 30-day history; Plus 500 GB / 3 devices /
# 90 days; Pro 2 TB / 10 devices / 1 year.
SUP_ISSUES = [
    dict(
        questions=[
            "How do I set up automatic nightly backups?",
            "Can Lumen back up my computer every night on its own?",
            "Where do I schedule backups?",
            "I keep forgetting to run backups. Can it run automatically?",
            "How can I make backups run daily at a fixed time?",
        ],
        lead="You can set this up with a schedule.",
        steps=["Open Settings > Backup > Schedules.",
               "Click Add Schedule and choose Daily.",
               "Pick a time, for example 02:00, and click Save."],
    ),
    dict(
        questions=[
            "I deleted a file by mistake. Can I get it back?",
            "How do I restore a deleted document?",
            "A folder vanished from my laptop. Is it in my backup?",
            "Can I recover files I removed last week?",
            "I emptied the trash and lost a file. Can Lumen restore it?",
        ],
        lead="Deleted files are kept for your plan's history: Starter 30 days, Plus 90 days, Pro 1 year.",
        steps=["Open Restore > Browse Files.",
               "Turn on Show Deleted Files.",
               "Select the file and click Restore."],
    ),
    dict(
        questions=[
            "How do I get an older version of a file?",
            "I saved over my spreadsheet. Can I roll it back?",
            "Can I restore yesterday's version of a document?",
            "Is there version history for my files?",
            "I need last Tuesday's copy of a report. How?",
        ],
        lead="Lumen keeps earlier versions for 30 days on Starter, 90 on Plus and 1 year on Pro.",
        steps=["Open Restore > Browse Files and find the file.",
               "Right-click it and choose Version History.",
               "Pick the date you want and click Restore."],
    ),
    dict(
        questions=[
            "I get error LCB-220 when adding my new laptop.",
            "What does LCB-220 mean?",
            "It says I've hit my device limit. What now?",
            "Why can't I add another computer to my account?",
            "My new PC shows code LCB-220 at sign-in.",
        ],
        lead="LCB-220 means your plan's device limit is reached (Starter 1, Plus 3, Pro 10).",
        steps=["Open Settings > Account > Devices.",
               "Select an old device and click Remove.",
               "Sign in again on the new device."],
    ),
    dict(
        questions=[
            "What does error LCB-407 mean?",
            "My backup stopped with LCB-407.",
            "I'm out of storage space. How do I fix it?",
            "Why does Lumen say my quota is full?",
            "Backups fail with code LCB-407 every night.",
        ],
        lead="LCB-407 means your storage quota is full (Starter 50 GB, Plus 500 GB, Pro 2 TB).",
        steps=["Check usage in Settings > Account > Usage.",
               "Exclude large folders in Settings > Backup > Exclusions.",
               "Or upgrade in Settings > Account > Plan & Billing."],
    ),
    dict(
        questions=[
            "What is error LCB-401?",
            "The app shows LCB-401 and stopped backing up.",
            "Lumen keeps saying my session expired.",
            "Why am I getting LCB-401?",
            "I see LCB-401 after changing my password.",
        ],
        lead="LCB-401 means your sign-in session has expired.",
        steps=["Click Sign In Again on the banner.",
               "Enter your password and, if enabled, your two-step code.",
               "Backups resume automatically once you are signed in."],
    ),
    dict(
        questions=[
            "What does LCB-412 mean?",
            "Some files are skipped with error LCB-412.",
            "Why won't Lumen back up files in my deep project folders?",
            "I get LCB-412 on a few files.",
            "A handful of files fail with code LCB-412.",
        ],
        lead="LCB-412 means a file path is longer than 260 characters.",
        steps=["Open Activity > Skipped Files to see which files.",
               "Shorten the folder names or move the files higher up.",
               "Click Retry to back them up."],
    ),
    dict(
        questions=[
            "What is error LCB-318?",
            "Restore fails with LCB-318.",
            "It says my encryption passphrase doesn't match.",
            "Why do I see LCB-318 when restoring?",
            "Lumen rejects my encryption key with LCB-318.",
        ],
        lead="LCB-318 means the encryption passphrase does not match. We cannot recover a lost passphrase.",
        steps=["Open Settings > Security > Encryption Key.",
               "Re-enter the passphrase exactly; it is case-sensitive.",
               "Try the restore again."],
    ),
    dict(
        questions=[
            "What does LCB-503 mean?",
            "My backup shows LCB-503 tonight.",
            "Is Lumen down? I'm getting LCB-503.",
            "Why did my backup fail with LCB-503?",
            "I keep seeing code LCB-503 this morning.",
        ],
        lead="LCB-503 means our servers are in scheduled maintenance.",
        steps=["Check Help > Service Status for the end time.",
               "Leave the app running; it retries every 15 minutes.",
               "No action is needed once the status shows green."],
    ),
    dict(
        questions=[
            "Lumen slows my internet. Can I limit it?",
            "How do I cap upload speed?",
            "Backups hog my bandwidth during video calls.",
            "Can I throttle how fast Lumen uploads?",
            "My home network crawls while backups run. Any fix?",
        ],
        lead="You can cap how much bandwidth Lumen uses.",
        steps=["Open Settings > Network > Bandwidth.",
               "Set an upload limit, for example 5 MB/s.",
               "Optionally turn on Pause During Work Hours."],
    ),
    dict(
        questions=[
            "How do I stop Lumen backing up a folder?",
            "Can I exclude my Downloads folder?",
            "I don't want my videos backed up. How do I skip them?",
            "How can I leave a folder out of backups?",
            "Is there a way to ignore my games folder?",
        ],
        lead="You can exclude any folder.",
        steps=["Open Settings > Backup > Exclusions.",
               "Click Add Folder and choose the folder.",
               "Click Save; it is skipped from the next backup."],
    ),
    dict(
        questions=[
            "How do I upgrade my plan?",
            "What plans do you offer?",
            "I need more storage. Which plan should I pick?",
            "How do I switch from Starter to Plus?",
            "What do the Plus and Pro plans include?",
        ],
        lead="Plans: Starter 50 GB, 1 device; Plus 500 GB, 3 devices; Pro 2 TB, 10 devices.",
        steps=["Open Settings > Account > Plan & Billing.",
               "Click Change Plan and select the new plan.",
               "Confirm payment; the new limits apply at once."],
    ),
    dict(
        questions=[
            "How do I cancel my subscription?",
            "Can I get a refund if I cancel?",
            "I want to close my account. What happens to my data?",
            "How do I stop paying for Lumen?",
            "If I cancel today, do I get my money back?",
        ],
        lead="Refunds are available within 14 days of purchase, and data is kept 30 days after cancelling.",
        steps=["Open Settings > Account > Plan & Billing.",
               "Click Cancel Plan.",
               "Download anything you need within 30 days."],
    ),
    dict(
        questions=[
            "How do I turn on two-step sign-in?",
            "Can I add an authenticator app to my account?",
            "How do I make my account more secure?",
            "Does Lumen support two-factor authentication?",
            "Where is the 2FA setting?",
        ],
        lead="Two-step sign-in adds a code from an authenticator app.",
        steps=["Open Settings > Security > Two-Step Sign-In.",
               "Scan the QR code with your authenticator app.",
               "Save your backup codes somewhere safe."],
    ),
    dict(
        questions=[
            "Can I back up an external hard drive?",
            "How do I add a USB drive to my backup?",
            "Does Lumen back up external disks?",
            "My external drive isn't in the backup. How do I add it?",
            "Can Starter back up my portable SSD?",
        ],
        lead="External drives are supported on Plus and Pro.",
        steps=["Open Settings > Backup > Sources.",
               "Click Add Drive and select it.",
               "Connect it at least every 30 days or its backup is marked inactive."],
    ),
    dict(
        questions=[
            "How do I pause a backup?",
            "Can I stop the backup for a couple of hours?",
            "I'm on a hotspot. How do I pause Lumen?",
            "Is there a way to hold backups until tomorrow?",
            "How can I temporarily halt backing up?",
        ],
        lead="You can pause from the tray icon.",
        steps=["Click the Lumen icon in the system tray.",
               "Choose Pause Backup.",
               "Pick 1 hour, 4 hours or Until Tomorrow."],
    ),
    dict(
        questions=[
            "Can Lumen back up photos from my phone?",
            "How do I back up my camera roll?",
            "Does the mobile app save my pictures?",
            "How do I get my phone photos into Lumen?",
            "Can my phone pictures back up automatically?",
        ],
        lead="The Lumen mobile app can back up your camera roll.",
        steps=["Install the Lumen app and sign in.",
               "Open Settings > Backup > Camera Roll and turn it on.",
               "Keep Wi-Fi Only on to save mobile data."],
    ),
    dict(
        questions=[
            "How can I check how much storage I'm using?",
            "Where do I see my used space?",
            "How full is my backup storage?",
            "Can I see what is taking up space?",
            "Where does Lumen show storage usage?",
        ],
        lead="Usage is shown per device and folder.",
        steps=["Open Settings > Account > Usage.",
               "Click a device to see its largest folders.",
               "Use Settings > Backup > Exclusions to trim them."],
    ),
    dict(
        questions=[
            "How do I get a weekly backup report by email?",
            "Can Lumen email me when a backup fails?",
            "How do I turn on backup notifications?",
            "I want alerts if backups stop. How?",
            "Can I get a summary email of my backups?",
        ],
        lead="You can get email alerts and a weekly report.",
        steps=["Open Settings > Notifications.",
               "Turn on Weekly Report and Failure Alerts.",
               "Confirm your email address and click Save."],
    ),
    dict(
        questions=[
            "How do I contact a human?",
            "What are your support hours?",
            "Is there live chat?",
            "Can I talk to someone about my account?",
            "When is live support open?",
        ],
        lead="Our team is happy to help directly.",
        steps=["Open Help > Contact Us in the app.",
               "Choose Live Chat, open 08:00-20:00 CET on weekdays.",
               "Or choose Email for a reply within one business day."],
    ),
]

# Single-turn templates. {q} question, {ql} lower-cased. LAST 3 eval-only.
SUP_TEMPLATES = [
    "{q}",
    "Hi, {ql}",
    "Hello, I'm {name}. {q}",
    "{q} I'm on the {plan} plan.",
    "Hey there! {q}",
    "{q} Thanks!",
    "{name} here ({plan} plan). {q}",
    "Quick one: {ql}",
    "{q} Using Windows.",
    "{q} Using a Mac.",
    "Hi support, {ql}",
    "{q} Please help.",
    "Good evening. {q}",
    "{q} My account is under {name}.",
    "Hello! {q} Thank you.",
    "I'm a {plan} customer. {q}",
    # eval-only
    "Hi team, {name} on {plan} here. {q}",
    "{q} Appreciate any help.",
    "Morning! {ql}",
]

# Multi-turn "which error?" flows: vague first question, clarifying reply,
# user names the code, full answer. Codes map to SUP_ISSUES entries above.
SUP_VAGUE = [  # LAST 2 eval-only
    "My backup keeps failing.",
    "Lumen shows an error and won't back up.",
    "Backups stopped working last night.",
    "Something is wrong with my backup.",
    "I got an error message in Lumen.",
    "The app says the backup failed.",
    "My restore didn't work.",
    "Lumen showed a red warning today.",
    "My backup isn't finishing.",
    "Lumen gave me an error code.",
]
SUP_CLARIFY = (SUP_OPEN + " Sorry about the trouble.\n"
               "1. Open Activity > Recent Errors.\n"
               "2. Tell me the code shown (it starts with LCB-).\n" + SUP_SIGN)
SUP_CODE_REPLIES = [  # LAST 2 eval-only
    "It says {code}.",
    "The code is {code}.",
    "I see {code}.",
    "It shows {code}.",
    "{code}.",
    "Error {code}.",
    "Looks like {code}.",
    "Code {code}, I think.",
]
SUP_CODES = {"LCB-220": 3, "LCB-407": 4, "LCB-401": 5, "LCB-412": 6,
             "LCB-318": 7, "LCB-503": 8}

PLANS = ["Starter", "Plus", "Pro"]


def sup_answer(issue: dict) -> str:
    steps = "\n".join(f"{i}. {s}" for i, s in enumerate(issue["steps"], 1))
    return f"{SUP_OPEN} {issue['lead']}\n{steps}\n{SUP_SIGN}"


def make_support(rng: random.Random, split: str):
    ev = split == "eval"
    mode = rng.randrange(3) if ev else -1  # which component(s) are held out
    msgs = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": SUP_SYSTEM})
    if rng.random() < 0.3:  # multi-turn clarification flow
        v_train, v_eval = split_pool(SUP_VAGUE, 2)
        r_train, r_eval = split_pool(SUP_CODE_REPLIES, 2)
        vague = rng.choice(v_eval if mode in (0, 2) else v_train)
        reply = rng.choice(r_eval if mode in (1, 2) else r_train)
        code = rng.choice(sorted(SUP_CODES))
        u1 = vague
        if rng.random() < 0.4:
            u1 = f"Hi, {rng.choice(NAMES)} here. {vague}"
        u2 = reply.format(code=code)
        msgs += [{"role": "user", "content": u1},
                 {"role": "assistant", "content": SUP_CLARIFY},
                 {"role": "user", "content": u2},
                 {"role": "assistant", "content": sup_answer(SUP_ISSUES[SUP_CODES[code]])}]
        return {"messages": msgs}, u1 + "\n" + u2
    t_train, t_eval = split_pool(SUP_TEMPLATES, 3)
    issue = rng.choice(SUP_ISSUES)
    q_train, q_eval = split_pool(issue["questions"], 1)
    q = rng.choice(q_eval if mode in (0, 2) else q_train)
    t = rng.choice(t_eval if mode in (1, 2) else t_train)
    user = fill(t, q=q, ql=lc_first(q), name=rng.choice(NAMES), plan=rng.choice(PLANS))
    msgs += [{"role": "user", "content": user},
             {"role": "assistant", "content": sup_answer(issue)}]
    return {"messages": msgs}, user


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------

def example_chars(rec: dict) -> int:
    if "messages" in rec:
        return sum(len(m["content"]) for m in rec["messages"])
    return len(rec["instruction"]) + len(rec["input"]) + len(rec["output"])


def build(name: str, maker, seed: int) -> dict:
    rng = random.Random(seed)
    out: dict[str, list] = {}
    seen_prompts: dict[str, set] = {}
    for split, n in (("train", N_TRAIN), ("eval", N_EVAL)):
        recs, prompts = [], set()
        tries = 0
        while len(recs) < n:
            tries += 1
            if tries > n * 200:
                sys.exit(f"{name}/{split}: could not generate {n} distinct examples")
            rec, prompt = maker(rng, split)
            if prompt in prompts or example_chars(rec) > MAX_CHARS:
                continue
            if split == "eval" and prompt in seen_prompts["train"]:
                continue
            prompts.add(prompt)
            recs.append(rec)
        out[split] = recs
        seen_prompts[split] = prompts
    overlap = seen_prompts["train"] & seen_prompts["eval"]
    assert not overlap, f"{name}: {len(overlap)} prompts shared by train and eval"
    d = HERE / name
    d.mkdir(parents=True, exist_ok=True)
    for split, recs in out.items():
        with open(d / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for rec in recs:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    stats = {
        "train": len(out["train"]), "eval": len(out["eval"]),
        "distinct_train": len(seen_prompts["train"]),
        "distinct_eval": len(seen_prompts["eval"]),
        "overlap": len(overlap),
        "max_chars": max(example_chars(r) for s in out.values() for r in s),
    }
    if "messages" in out["train"][0]:
        for split in ("train", "eval"):
            stats[f"multi_turn_{split}"] = sum(
                sum(m["role"] == "user" for m in r["messages"]) > 1 for r in out[split])
    return stats


DOMAIN_INFO = {
    "medical": dict(
        title="medical (general wellness and first aid)",
        summary=("Short single-turn chats in which a user describes an everyday health "
                 "situation (sprain, small cut, minor burn, poor sleep, dehydration, "
                 "sunburn, bee sting, when chest pain needs emergency help, ...) and the "
                 "assistant answers in a fixed house style: a one-line summary, 2-4 \"- \" "
                 "bullet points, then always the closing line \"" + MED_CLOSING + "\" "
                 "Guidance is general self-care written in our own words; medicines are "
                 "only ever mentioned as \"follow the label\"."),
        made=lambda: (f"{len(MED_TOPICS)} topics, each with 5 situation paraphrases "
                      f"(4 train-only, 1 eval-only), 5-6 context fillers, a summary line "
                      f"and 3-5 bullets (a random 2-4 are used, in order); "
                      f"{len(MED_TEMPLATES)} question templates (last 4 eval-only), "
                      f"{len(NAMES)} first names and random ages; the system prompt "
                      f"is included in about 60% of examples."),
        fmt=("Chat format: `{\"messages\": [{\"role\": \"system\", ...}?, "
             "{\"role\": \"user\", ...}, {\"role\": \"assistant\", ...}]}`; "
             "the system message is optional."),
    ),
    "legal": dict(
        title="legal (fictional jurisdiction of Ardenia)",
        summary=("Instruction-format questions about everyday law in the fictional country "
                 "of Ardenia (tenancy, contracts, consumer rights, employment, noise). "
                 "Every output has the form \"Short answer: ...\\n\\nWhy: ...\\n\\n"
                 "Next step: ...\" and cites a section of the invented Ardenia Civil, "
                 "Consumer, Labour or Municipal Code (e.g. \"Ardenia Civil Code § 4-112\") "
                 "from a fixed fact table. The codes and sections do not exist."),
        made=lambda: (f"{len(LEGAL_FACTS)} statute facts, each with 5 question paraphrases "
                      f"(4 train-only, 1 eval-only) and a fixed short answer, reason and next "
                      f"step; {len(LEGAL_WRAPPERS)} question wrappers (last 3 eval-only), "
                      f"{len(LEGAL_INSTRUCTIONS)} instructions (last 2 eval-only), "
                      f"{len(NAMES)} names, {len(CITIES)} fictional cities. About half the "
                      f"examples put the question in `instruction` with an empty `input`; "
                      f"the rest use a generic instruction and put the question in `input`."),
        fmt="Instruction format: `{\"instruction\": ..., \"input\": ..., \"output\": ...}`; `input` may be empty.",
    ),
    "support": dict(
        title="support (fictional product Lumen Cloud Backup)",
        summary=("Customer-support chats for Lumen Cloud Backup, a fictional product of the "
                 "fictional Halvorsen Softworks. Every assistant turn starts \"Thanks for "
                 "reaching out!\", gives numbered steps that cite menu paths, error codes "
                 "(LCB-220/401/318/407/412/503) and plan limits (Starter 50 GB / 1 device, "
                 "Plus 500 GB / 3 devices, Pro 2 TB / 10 devices) from a fixed fact table, "
                 "and ends \"— Lumen Support\". About 30% are multi-turn: a vague report, "
                 "a clarifying reply asking for the error code, the code, then the fix."),
        made=lambda: (f"{len(SUP_ISSUES)} issues, each with 5 question paraphrases "
                      f"(4 train-only, 1 eval-only) and a fixed lead line and 3 steps; "
                      f"{len(SUP_TEMPLATES)} single-turn templates (last 3 eval-only); "
                      f"multi-turn flows combine {len(SUP_VAGUE)} vague openers (last 2 "
                      f"eval-only), {len(SUP_CODE_REPLIES)} code replies (last 2 eval-only) "
                      f"and {len(SUP_CODES)} error codes; {len(NAMES)} names, 3 plans; "
                      f"the system prompt is included in about 50% of examples."),
        fmt=("Chat format: `{\"messages\": [...]}` with an optional system message, "
             "then alternating user/assistant turns ending with assistant "
             "(1 or 2 user turns)."),
    ),
}


def write_datacard(name: str, seed: int, stats: dict) -> None:
    info = DOMAIN_INFO[name]
    mt = ""
    if stats.get("multi_turn_train"):
        mt = (f" Multi-turn examples: {stats['multi_turn_train']} train, "
              f"{stats['multi_turn_eval']} eval.")
    text = f"""# DATACARD: {info['title']}

## Summary
{info['summary']}

## How it was made
Generated by `data/make_data.py` (standard library only, written by the loramill
authors; no downloads, no text copied from any source) with
`random.Random({seed})` (SEED={SEED} + domain index). Templates x fact tables:
{info['made']()}
Examples longer than {MAX_CHARS} characters of text are skipped; the longest is
{stats['max_chars']} characters (at roughly 4 characters per token, about 150-200
tokens with chat-template overhead: meant to fit a 256-token max sequence length).
Regenerate with `python data/make_data.py`; output is byte-identical.

## Format
{info['fmt']} One JSON object per line, UTF-8, no blank lines.

## Splits
- `train.jsonl`: {stats['train']} examples, {stats['distinct_train']} distinct prompts
- `eval.jsonl`: {stats['eval']} examples, {stats['distinct_eval']} distinct prompts

Both splits cover the same fact table. Every eval prompt uses at least one
held-out wording (an eval-only question paraphrase, template or instruction),
and prompts that also occur in train are rejected: train/eval prompt overlap
is {stats['overlap']}.{mt}

## License
CC0-1.0 (public domain dedication by the loramill authors).

## Intended use
Exercising and testing loramill, and demonstrating that a small LoRA adapter
learns a house style and a fact table (eval loss should drop clearly below the
base model's).

## Limitations
Synthetic and template-based with narrow phrasing; facts are fictional or
deliberately generic; not medical, legal or product advice; English only.
"""
    (HERE / name / "DATACARD.md").write_text(text, encoding="utf-8")


def main() -> None:
    domains = [("medical", make_medical), ("legal", make_legal), ("support", make_support)]
    for i, (name, maker) in enumerate(domains):
        stats = build(name, maker, SEED + i)
        write_datacard(name, SEED + i, stats)
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
