"""Word lists: common English words, places, honorifics, name particles and street types."""

from __future__ import annotations

from functools import cache


def word_seq(*lines: str) -> tuple[str, ...]:
    """The whitespace-separated words of `lines`, in order."""
    return tuple(word for line in lines for word in line.split())


def word_set(*lines: str) -> frozenset[str]:
    """The whitespace-separated words of `lines`."""
    return frozenset(word_seq(*lines))


# Words that are also given names; capitalised at the start of a sentence they prove nothing.
AMBIGUOUS_GIVEN = word_set(
    "may will bill rose grant mark hope faith joy grace amber ruby summer autumn dawn holly ivy",
    "lily daisy iris violet jasmine crystal pearl sky rich frank jack guy pat sue don ray art",
    "chase hunter carter mason price sunny wade drew gene dean miles lane reed rod nick max bob",
    "rob cliff penny chance trinity harmony destiny justice angel major king prince marshall page",
    "sterling tanner baker cook porter forest river brook storm rain snow star june april august",
    "christian hazel heather jade olive poppy willow sage ginger honey candy cherry melody music",
    "sonny chip buck duke earl rusty dusty woody sandy misty stormy scott jordan paris florence",
    "sydney austin dallas madison victoria georgia chelsea lincoln troy carolina virginia phoenix",
    "orlando savannah camden dakota houston denver memphis cleveland eugene salem regina adelaide",
    "winston charlotte kent york lorraine alma bo clay dale glen kelly lee terry norman noble",
    "patience precious royal",
)

MONTHS = word_set(
    "january february march april may june july august september october november december",
)

WEEKDAYS = word_set(
    "monday tuesday wednesday thursday friday saturday sunday",
)

# Capitalised words of ordinary prose, code and product talk that the Faker vocabulary lacks.
EXTRA_COMMON = word_set(
    "hello hi hey dear thanks thank please sorry yes no ok okay yeah sure welcome goodbye cheers",
    "the this that these those it its he she we they you your yours our ours their theirs his her",
    "him them my mine me us i an a and but or nor if when while after before because so then",
    "there here what which who whom whose how why where whether although though unless until",
    "since once also just only even still yet already soon today tomorrow yesterday tonight now",
    "later never always often sometimes usually maybe perhaps however therefore meanwhile",
    "moreover anyway first second third last next final new old big small great good bad best",
    "better worse worst north south east west northern southern eastern western central upper",
    "lower inner outer museum centre center bay falls canyon valley cafe castle palace gallery",
    "theatre theater stadium avenue gardens garden opera memorial forecast weather sunny cloudy",
    "rainy windy snowy foggy stormy humid chilly warm cold hot mild flour butter pepper garlic",
    "onion tomato pasta passport luggage boil bake roast grill fry simmer stir whisk minutes",
    "minute hours hour seconds degrees celsius fahrenheit pro max mini plus ultra lite laptop",
    "tablet update updates python java rust module modules deploy server servers api apis token",
    "tokens password invoice invoices shipping airport airports station stations bridge bridges",
    "tower towers hall halls square squares river rivers lake lakes mountain mountains beach",
    "beaches island islands hotel hotels restaurant restaurants church churches library libraries",
    "market markets store stores shop shops bank banks club clubs team teams street streets road",
    "roads park parks university universities college colleges school schools hospital hospitals",
    "clinic institute foundation society company companies inc ltd llc corp group holdings",
    "partners labs studio studios cloud data database docs documentation guide tutorial release",
    "releases version versions edition beta alpha stable nightly preview build builds test tests",
    "testing bug bugs fix fixes patch patches feature features issue issues pull request requests",
    "merge branch commit commits repository repo code coding function functions class classes",
    "method methods object objects string strings integer integers float boolean list lists dict",
    "array arrays map maps set sets tuple value values key keys index error errors exception",
    "exceptions warning warnings debug info log logs logger logging config configuration settings",
    "setting option options user users admin client clients service services app apps application",
    "applications web website page pages site sites browser chrome firefox safari edge windows",
    "linux mac macos ios android ubuntu debian docker kubernetes git github gitlab npm pip node",
    "react vue angular django flask fastapi spring express javascript typescript golang kotlin",
    "swift scala ruby rails perl php html css json yaml xml sql postgres postgresql mysql redis",
    "mongodb sqlite nginx apache aws azure gcp google microsoft apple amazon netflix spotify",
    "tesla samsung sony nintendo playstation xbox iphone ipad macbook pixel galaxy kindle alexa",
    "siri excel word powerpoint outlook slack zoom skype office photoshop figma notion jira",
    "trello monday tuesday wednesday thursday friday saturday sunday weekend weekday week weeks",
    "month months year years day days morning afternoon evening night midnight noon autumn fall",
    "winter summer holiday holidays christmas easter thanksgiving halloween eve recipe recipes",
    "kitchen oven stove pan pot bowl cup cups spoon tablespoon teaspoon gram grams kilogram",
    "kilograms litre liter litres liters ounce ounces pound pounds salt sugar rice bread cake",
    "cookie cookies chocolate coffee tea milk cream cheese egg eggs chicken beef pork fish salmon",
    "tuna shrimp soup salad sauce lemon lime orange oranges apples banana bananas berry berries",
    "strawberry blueberry grape grapes potato potatoes carrot carrots basil oregano thyme",
    "rosemary parsley cinnamon vanilla honey yogurt oil vinegar dough pizza burger sandwich",
    "breakfast lunch dinner dessert snack meal meals dish dishes flight flights train trains bus",
    "buses ticket tickets trip trips travel travelling traveling journey tour tours tourist",
    "tourists visit visiting coast harbour harbor port ferry cruise airline airlines terminal",
    "gate gates boarding departure arrival arrivals departures platform metro subway tram taxi",
    "car cars rental booking reservation check checkout order orders total subtotal discount",
    "coupon price prices cost costs tax taxes refund refunds delivery deliveries customer",
    "customers support helpdesk account accounts payment payments receipt receipts cart sale",
    "sales offer offers deal deals free returns meeting meetings conference agenda project",
    "projects report reports review reviews budget deadline deadlines manager managers director",
    "directors department departments board chapter section figure table appendix note notes",
    "summary introduction conclusion abstract references reference part step steps example",
    "examples question questions answer answers problem problems solution solutions exercise",
    "exercises lesson lessons course courses math maths mathematics algebra geometry calculus",
    "physics chemistry biology history science english french german spanish italian dutch",
    "portuguese japanese chinese indian american british european african asian australian",
    "canadian mexican brazilian russian swiss austrian belgian irish scottish welsh greek turkish",
    "polish swedish norwegian danish finnish goal goals score scores match matches game games",
    "player players league season seasons temperature temperatures rain snow wind storm storms",
    "sun sunshine clouds fog umbrella jacket coat boots shoes hat scarf gloves happy sad tired",
    "busy ready fine glad excited hungry thirsty late early don't can't won't isn't aren't it's",
    "i'm you're we're they're that's what's let's there's read readme install installation usage",
    "license contributing changelog todo fixme true false none null undefined nan inf self cls",
    "args kwargs return yield import from async await def lambda print range len str int bool",
    "bytes type super via per etc vs re fyi asap pm am mr mrs ms dr",
)

# Place names: never the last word of a name unless a family name, never a lone first word.
PLACES = word_set(
    "london paris berlin madrid rome milan naples turin venice florence vienna zurich geneva",
    "amsterdam rotterdam brussels antwerp lisbon porto barcelona valencia seville munich hamburg",
    "frankfurt cologne stuttgart dresden leipzig prague budapest warsaw krakow moscow athens",
    "istanbul dublin edinburgh glasgow manchester liverpool birmingham leeds bristol oxford",
    "cambridge york brighton cardiff belfast oslo stockholm copenhagen helsinki reykjavik tokyo",
    "kyoto osaka seoul beijing shanghai hong kong singapore bangkok delhi mumbai bangalore",
    "chennai kolkata sydney melbourne brisbane perth adelaide auckland wellington toronto",
    "montreal vancouver ottawa calgary boston chicago houston dallas austin denver seattle",
    "portland phoenix atlanta miami orlando detroit philadelphia pittsburgh baltimore washington",
    "nashville memphis vegas angeles francisco diego jose jersey orleans brooklyn manhattan",
    "queens bronx texas california florida georgia virginia carolina ohio michigan oregon nevada",
    "arizona utah colorado montana idaho alaska hawaii maine vermont massachusetts kentucky",
    "tennessee alabama louisiana arkansas missouri kansas nebraska dakota iowa minnesota",
    "wisconsin illinois indiana oklahoma mexico canada brazil argentina chile peru colombia",
    "venezuela cuba jamaica england scotland wales ireland britain france germany spain italy",
    "portugal netherlands holland belgium switzerland austria poland sweden norway denmark",
    "finland iceland greece turkey russia ukraine egypt morocco kenya nigeria africa asia europe",
    "america australia india china japan korea vietnam thailand indonesia philippines israel",
    "jordan lebanon iran iraq dubai qatar cairo rio janeiro paulo aires santiago lima bogota",
    "havana cancun alps andes himalayas sahara amazon nile thames seine danube rhine hudson",
    "mississippi pacific atlantic mediterranean caribbean baltic everest kilimanjaro fuji",
    "hollywood victoria lincoln madison jackson columbus charlotte savannah salem springfield",
    "chelsea kensington soho camden notting westminster greenwich richmond windsor bath",
)

HONORIFICS = word_seq(
    "Mr. Mr Mrs. Mrs Ms. Ms Miss Mx. Mx Dr. Dr Prof. Prof Herr Frau Mme. Mme Mlle. Mlle Madame",
    "Monsieur Sr. Sra. Srta. Dra. Don Doña Dott. Dott.ssa Sig. Sig.ra Signor Signora Dhr. Mevr.",
    "Sir Dame Lady Lord Rev. Fr.",
)

# Honorifics that are also ordinary words or abbreviations: the next word must be in the lexicon.
WEAK_HONORIFICS = word_set(
    "Sr. Miss M. Dame Fr. Sir Lord Don Lady",
)

PARTICLES = word_set(
    "van von der den de del della delle dei degli la le les du da das dos do di ten ter te 't y e",
    "bin ibn al el mac en",
    "بن بنت آل أبو ابن بنو",  # Arabic: bin, bint, al, abu, ibn, banu
)

EN_STREET_TYPES = word_seq(
    "Street St Avenue Ave Road Rd Boulevard Blvd Lane Ln Drive Dr Court Ct Place Pl Square Sq",
    "Terrace Ter Way Close Crescent Cres Grove Gardens Mews Parkway Pkwy Highway Hwy Circle Cir",
    "Trail Trl Alley Plaza Expressway Freeway Turnpike Stravenue Causeway Bypass Crossing",
    "Crossroad Walk Row Wynd Marg Chowk Ganj Nagar Zila",
)
# Street types that are also landscape words: only an address after a word from the name lexicon.
EN_FEATURE_TYPES = word_seq(
    "Branch Bridge Brook Brooks Burg Burgs Camp Canyon Cape Center Centers Circles Cliff Cliffs",
    "Club Common Corner Corners Course Courts Cove Coves Creek Crest Curve Dale Dam Divide Drives",
    "Estate Estates Extension Extensions Fall Falls Ferry Field Fields Flat Flats Ford Fords",
    "Forest Forge Forges Fork Forks Fort Garden Gateway Glen Glens Green Greens Groves Harbor",
    "Harbors Haven Heights Hill Hills Hollow Inlet Island Islands Isle Junction Junctions Key",
    "Keys Knoll Knolls Lake Lakes Land Landing Light Lights Loaf Lock Locks Lodge Loop Mall Manor",
    "Manors Meadow Meadows Mill Mills Mission Motorway Mount Mountain Mountains Neck Orchard Oval",
    "Overpass Park Parks Parkways Pass Passage Path Pike Pine Pines Plain Plains Point Points",
    "Port Ports Prairie Radial Ramp Ranch Rapid Rapids Rest Ridge Ridges River Roads Route Rue",
    "Run Shoal Shoals Shore Shores Skyway Spring Springs Spur Spurs Squares Station Stream",
    "Streets Summit Throughway Trace Track Trafficway Tunnel Union Unions Valley Valleys Via",
    "Viaduct View Views Village Villages Ville Vista Walks Wall Ways Well Wells Rise Gate Wharf",
    "Quay Yard Parade Drove Croft Chase Underpass",
)
# Suffixes of one-word German and Dutch street names ("Hauptstraße", "Kerkstraat").
COMPOUND_STREET_SUFFIXES = word_seq(
    "straße strasse str. weg gasse platz allee ring damm ufer chaussee pfad steig markt graben",
    "kai straat laan plein gracht kade singel dijk hof dreef pad steeg baan boulevard",
)
SEPARATE_STREET_WORDS = word_seq(
    "Straße Strasse Str. Weg Gasse Platz Allee Ring Damm Ufer Chaussee Markt",
)
# Romance-language street types written before the name ("Calle Mayor 5", "Via Roma 10").
ROMANCE_STREET_TYPES = word_seq(
    "Calle C/ C. Avenida Avda. Av. Plaza Pza. Paseo Camino Carretera Ronda Rambla Glorieta",
    "Callejón",
    "Cañada Alameda Acceso Pasaje Cuesta Pasadizo Urbanización Travesía Vial Via Viale Piazza",
    "Piazzale Corso Largo Vicolo Strada Contrada Borgo Rotonda Stretto Incrocio Canale Lungomare",
    "Rua Travessa Praça Rodovia Estrada Ladeira Aeroporto Área Campo Chácara Colônia Condomínio",
    "Conjunto Distrito Esplanada Estação Favela Fazenda Feira Jardim Lago Lagoa Loteamento Morro",
    "Núcleo Parque Passarela Pátio Praia Quadra Recanto Residencial Setor Sítio Trecho Trevo Vale",
    "Vereda Viaduto Viela Vila",
)
FRENCH_STREET_TYPES = word_seq(
    "rue avenue av. boulevard bd place chemin allée impasse quai route cours passage square voie",
    "rond-point sentier faubourg promenade esplanade cité villa parvis hameau montée résidence",
)


def _plural(word: str) -> tuple[str, ...]:
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return (word, word + "es")
    if word.endswith("y") and len(word) > 2 and word[-2] not in "aeiou":
        return (word, word[:-1] + "ies")
    return (word, word + "s")


@cache
def common_words() -> frozenset[str]:
    """Lower-case common English words: Faker's en_US vocabulary, the extras and their plurals."""
    from faker.providers.lorem.en_US import Provider

    words: set[str] = {w.lower() for w in Provider.word_list}
    for group in Provider.parts_of_speech.values():
        words.update(w.lower() for w in group)
    words |= EXTRA_COMMON | MONTHS | WEEKDAYS
    return frozenset(form for word in words for form in _plural(word))
